"""The verifier's fast grammars read exactly what its strict parsers read.

`parse_canonical_statement` takes only the canonical form and says None to
everything else; whatever it accepts (or refuses) must be what
`strict_statement` accepts (or refuses, with the same message), so the fast
path can never let through a statement the strict parser would refuse.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.errors import VerificationError
from tether.core.receipts import Receipt, ReceiptKind
from tether.core.states import TERMINAL
from tether.crypto.receipts import (
    FAST_STATEMENT_DEPTH,
    parse_canonical_statement,
    statement_bytes,
)
from tether.verify.builder import T0
from tether.verify.verifier import _canonical_hashes, _statement, strict_statement

_HEX = st.binary(min_size=8, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
_TEXT = st.text(max_size=10)
_NAME = st.text(min_size=1, max_size=10)
_DIGEST = st.one_of(st.just(""), _HEX)


@st.composite
def receipts(draw: st.DrawFn) -> Receipt:
    """Valid receipts of every kind (strings may need escapes: then the fast path declines)."""
    kind = draw(st.sampled_from(list(ReceiptKind)))
    seq = draw(st.integers(1, (1 << 64) - 1))
    finished = kind == ReceiptKind.TASK_FINISHED
    artifact = kind == ReceiptKind.ARTIFACT
    return Receipt(
        kind=kind,
        node_id=draw(_NAME),
        task_id=draw(_NAME),
        attempt=draw(st.integers(0, (1 << 32) - 1)),
        fencing_token=draw(st.integers(0, (1 << 64) - 1)),
        agent_id=draw(_TEXT),
        lease_id=draw(_TEXT),
        lease_issued_unix_ms=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
        lease_expires_unix_ms=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
        time_unix_ms=draw(st.one_of(st.just(T0), st.integers(-(1 << 63), (1 << 63) - 1))),
        seq=seq,
        prev="" if seq == 1 else draw(_HEX),
        policy_digest=draw(_DIGEST),
        tool=draw(_TEXT),
        arguments_sha256=draw(_DIGEST),
        result_sha256=draw(_DIGEST),
        duration_ms=draw(st.integers(0, (1 << 32) - 1)),
        cost_micros=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
        status=draw(_TEXT),
        reason=draw(_TEXT),
        final_state=int(draw(st.sampled_from(sorted(TERMINAL)))) if finished else 0,
        artifact_name=draw(_NAME) if artifact else draw(_TEXT),
        artifact_size=draw(st.integers(0, (1 << 64) - 1)),
        artifact_sha256=draw(_HEX) if artifact else draw(_DIGEST),
        idempotency_key=draw(_TEXT),
        memory_key=draw(_TEXT),
    )


def _outcome(parse: Any, payload: bytes) -> tuple[str, Any]:
    try:
        return ("receipt", parse(payload))
    except VerificationError as err:
        return ("refused", err.message)


def _fast(payload: bytes) -> Receipt | None:
    return parse_canonical_statement(payload)


def _strict(payload: bytes) -> Receipt:
    return strict_statement(payload, 16)


@settings(max_examples=400, deadline=None)
@given(receipts())
def test_canonical_statements_take_the_fast_path_and_read_the_same(r: Receipt) -> None:
    """A canonical statement without escapes is read by the grammar as the same receipt."""
    payload = statement_bytes(r)
    fast = parse_canonical_statement(payload)
    # Escapes, and integers as long as their type's bound, are the strict parser's to read.
    long = any(
        len(str(abs(getattr(r, f)))) >= len(str(hi)) for f, (_, _, _, hi) in _INT_FIELDS.items()
    )
    if b"\\" in payload or long:
        assert fast is None
    else:
        assert fast == r
    assert _strict(payload) == r
    assert _statement(payload, 16) == r


# Bytes that make a statement another statement, or not one: JSON syntax, digits,
# signs, escapes, control bytes, and bytes that are not UTF-8.
_BYTES = st.sampled_from([*b'"\\,:{}[]0123456789-+. eEAZ_az', 0x00, 0x1F, 0x7F, 0xC3, 0xFF])


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    """A canonical statement with one edit: a byte replaced, inserted or cut, or a run moved."""
    data = bytearray(statement_bytes(draw(receipts())))
    at = draw(st.integers(0, len(data) - 1))
    op = draw(st.sampled_from(["replace", "insert", "delete", "copy"]))
    if op == "replace":
        data[at] = draw(_BYTES)
    elif op == "insert":
        data.insert(at, draw(_BYTES))
    elif op == "delete":
        del data[at : at + draw(st.integers(1, 40))]
    else:  # repeat a run elsewhere: repeated members, repeated values
        n = draw(st.integers(1, 80))
        to = draw(st.integers(0, len(data)))
        data[to:to] = data[at : at + n]
    return bytes(data)


@settings(max_examples=3000, deadline=None)
@given(mutants())
def test_whatever_the_grammar_decides_the_strict_parser_decides_too(payload: bytes) -> None:
    """On edited statements the grammar declines, or reads or refuses as the strict parser does."""
    fast = _outcome(_fast, payload)
    if fast != ("receipt", None):
        assert fast == _outcome(_strict, payload)
    assert _outcome(lambda p: _statement(p, 16), payload) == _outcome(_strict, payload)


def _canonical() -> bytes:
    return statement_bytes(
        Receipt(
            kind=ReceiptKind.TOOL_CALL, node_id="n1", task_id="t", attempt=1, fencing_token=1,
            agent_id="a", lease_id="L", lease_issued_unix_ms=T0, lease_expires_unix_ms=T0 + 1,
            time_unix_ms=T0, seq=1, tool="x", status="ok",
        )
    )  # fmt: skip


def test_a_repeated_key_is_never_the_fast_paths() -> None:
    """A member given twice is refused by name, not read by the grammar (which keeps one)."""
    doc = _canonical().decode()
    twice = doc.replace('"tool":"x"', '"tool":"x","tool":"y"', 1).encode()
    assert twice != doc.encode()
    assert parse_canonical_statement(twice) is None
    with pytest.raises(VerificationError, match="appears twice"):
        _statement(twice, 16)


@pytest.mark.parametrize("depth", range(1, FAST_STATEMENT_DEPTH))
def test_a_depth_limit_below_the_statements_own_is_the_strict_parsers(depth: int) -> None:
    """Under --max-depth below a statement's nesting, it is refused as too deep, as before."""
    assert parse_canonical_statement(_canonical()) is not None
    with pytest.raises(VerificationError, match="nested deeper"):
        _statement(_canonical(), depth)


_INT_FIELDS = {  # field: (JSON name, quoted as a proto3 JSON 64-bit integer, lowest, highest)
    "version": ("version", False, 0, (1 << 32) - 1),
    "seq": ("seq", True, 0, (1 << 64) - 1),
    "attempt": ("attempt", False, 0, (1 << 32) - 1),
    "fencing_token": ("fencingToken", True, 0, (1 << 64) - 1),
    "lease_issued_unix_ms": ("leaseIssuedUnixMs", True, -(1 << 63), (1 << 63) - 1),
    "lease_expires_unix_ms": ("leaseExpiresUnixMs", True, -(1 << 63), (1 << 63) - 1),
    "time_unix_ms": ("timeUnixMs", True, -(1 << 63), (1 << 63) - 1),
    "duration_ms": ("durationMs", False, 0, (1 << 32) - 1),
    "cost_micros": ("costMicros", True, -(1 << 63), (1 << 63) - 1),
    "artifact_size": ("artifactSize", True, 0, (1 << 64) - 1),
}


@pytest.mark.parametrize("field", sorted(_INT_FIELDS))
@pytest.mark.parametrize("edge", ["below", "above"])
def test_integers_out_of_range_are_refused_by_name(field: str, edge: str) -> None:
    """An integer one past its proto type's range is refused by the strict parser, never read."""
    key, quoted, lo, hi = _INT_FIELDS[field]
    r = Receipt(
        kind=ReceiptKind.ARTIFACT, node_id="n1", task_id="t", attempt=7, fencing_token=7,
        agent_id="a", lease_id="L", lease_issued_unix_ms=7, lease_expires_unix_ms=7,
        time_unix_ms=7, seq=7, prev="ab" * 32, duration_ms=7, cost_micros=7,
        artifact_name="f", artifact_size=7, artifact_sha256="cd" * 32,
    )  # fmt: skip
    text = statement_bytes(r).decode()
    value = 1 if field == "version" else 7
    member = f'"{key}":"{value}"' if quoted else f'"{key}":{value}'
    assert text.count(member) == 1
    bad = lo - 1 if edge == "below" else hi + 1
    payload = text.replace(member, f'"{key}":"{bad}"' if quoted else f'"{key}":{bad}').encode()
    assert parse_canonical_statement(payload) is None
    # "-1" for an unsigned field is not even an integer to the strict parser.
    with pytest.raises(VerificationError, match=f"'{field}': (out of range|not an integer)"):
        _statement(payload, 16)


def test_proof_hash_check_is_the_canonical_hash_grammar() -> None:
    """The translate-based check of raw proof hashes accepts exactly `"H","H",...` of
    canonical 32-byte base64 (edits of quotes, commas, padding, letters all refused alike)."""
    rng = random.Random(2026)
    one = rb'"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]="'
    grammar = re.compile(one + rb"(?:," + one + rb")*")
    accepted = 0
    for _ in range(20_000):
        n = rng.randrange(1, 5)
        text = bytearray(b'"' + b'","'.join(
            base64.b64encode(rng.randbytes(32)) for _ in range(n)) + b'"')  # fmt: skip
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(text))
            byte = rng.choice(b'"=,A/+a9wx\x00\xff] ')
            op = rng.randrange(3)
            if op == 0:
                text[at] = byte
            elif op == 1:
                text.insert(at, byte)
            else:
                del text[at]
        want = grammar.fullmatch(bytes(text)) is not None
        assert _canonical_hashes(bytes(text)) == want, bytes(text)
        accepted += want
    assert 1_000 < accepted < 19_000
