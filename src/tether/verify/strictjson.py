"""Strict, bounded JSON for the verifier: what any JSON reader would see, or an error.

`json.loads` alone is too forgiving for evidence: a repeated key silently
keeps its last value (another reader may keep the first), deep nesting
raises `RecursionError`, it guesses UTF-16 or UTF-32 from the first bytes,
accepts `NaN` and `Infinity`, and a file of a billion empty objects costs
tens of bytes of memory per byte of input. `loads` refuses all of that,
before the parser allocates anything for it:

- UTF-8 only, and no ASCII control byte outside what JSON allows between
  tokens (tab, newline, carriage return), which also rejects binary garbage
  such as a file of zeros at its first byte;
- nesting at most `max_depth` levels, checked in a few linear passes of
  C-speed regular expressions (never by recursion);
- on inputs over 1 MiB, at least 16 bytes per JSON token on average, so the
  parsed objects' memory stays within a small multiple of the input's size
  (real bundles average about 50);
- no key twice in one object, and no `NaN`/`Infinity` literals.
"""

from __future__ import annotations

import json
import mmap
import re
from typing import Any

from tether.core.errors import VerificationError


class StrictJSONError(VerificationError):
    """The bytes are not strict JSON within the limits."""

    reason = "BUNDLE_FORMAT"


# A JSON string, escapes included (unrolled loop: fast on long base64 strings).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# Bytes JSON never holds raw (RFC 8259: controls must be escaped inside strings,
# and only tab, LF and CR may separate tokens).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20)])
_BRACKETS_ONLY = bytes(b for b in range(256) if b not in b"[]{}")
_WHITESPACE = b" \t\n\r"
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_SPARSE_FROM = 1 << 20  # inputs this large must average at least _BYTES_PER_TOKEN
_BYTES_PER_TOKEN = 16


def control_byte(data: bytes | bytearray | mmap.mmap) -> int:
    """The offset of the first byte that can never appear in JSON text, or -1 (1 MiB at a time)."""
    step = (
        1 << 20
    )  # bytes.translate is several times faster than a regex search; slices bound memory
    for i in range(0, len(data), step):
        part = data[i : i + step]
        if len(part.translate(None, _CONTROL_BYTES)) != len(part):
            m = _CONTROL.search(part)
            assert m is not None
            return i + m.start()
    return -1


def _nesting_ok(brackets: bytes, max_depth: int) -> bool:
    """True when bracket-only text nests at most `max_depth` deep and balances.

    Each pass deletes every innermost pair, so a structure of depth d vanishes
    after d passes; a run of more than `max_depth` openers ends it at once.
    Work: at most `max_depth` linear passes.
    """
    run = re.compile(rb"[\[{]{%d}" % (max_depth + 1))
    for _ in range(max_depth):
        if not brackets:
            return True
        if run.search(brackets) is not None:
            return False
        shorter = _EMPTY_PAIR.sub(b"", brackets)
        if len(shorter) == len(brackets):
            return False  # unbalanced or crossed brackets: not JSON either
        brackets = shorter
    return not brackets


def check_shape(data: bytes, max_depth: int) -> None:
    """Refuses control bytes, nesting deeper than `max_depth` and token-dense input.

    Raises:
        StrictJSONError: what is wrong, with the byte offset where it helps.
    """
    at = control_byte(data)
    if at >= 0:
        raise StrictJSONError(f"control byte 0x{data[at]:02x} at offset {at}: not JSON")
    if data.count(b"[") + data.count(b"{") <= max_depth and len(data) <= _SPARSE_FROM:
        return  # cannot nest deeper than it has openers, nor amplify memory
    outside, strings = _STRING.subn(b"", data)
    if not _nesting_ok(outside.translate(None, _BRACKETS_ONLY), max_depth):
        raise StrictJSONError(f"JSON nested deeper than {max_depth} levels (or unbalanced)")
    if len(data) > _SPARSE_FROM:
        tokens = strings + len(outside.translate(None, _WHITESPACE))
        if tokens * _BYTES_PER_TOKEN > len(data):
            raise StrictJSONError(
                f"{tokens} JSON tokens in {len(data)} bytes: too dense for a bundle "
                f"(at most one per {_BYTES_PER_TOKEN} bytes)"
            )


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise StrictJSONError(f"key {k[:60]!r} appears twice in one object")
            seen.add(k)
    return d


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_no_constant)


def loads(data: bytes, max_depth: int) -> Any:
    """Parses strict JSON (see the module docstring).

    Raises:
        StrictJSONError: not UTF-8, not JSON, a duplicate key, too deep or too dense.
    """
    check_shape(data, max_depth)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StrictJSONError(f"not UTF-8 at offset {err.start}") from err
    try:
        return _DECODER.decode(text)
    except RecursionError as err:  # pragma: no cover - check_shape bounds the depth first
        raise StrictJSONError("JSON nested too deeply") from err
    except ValueError as err:
        raise StrictJSONError(f"not JSON: {err}") from err
