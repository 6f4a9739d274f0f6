"""The fast receipt predicate encoder writes exactly what protobuf's proto3 JSON writes."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.receipts import ReceiptChain, parse_receipt, predicate_of, to_proto
from tether.verify.builder import T0, seeded_key

_U32 = st.integers(0, (1 << 32) - 1)
_U64 = st.integers(0, (1 << 64) - 1)
_I64 = st.integers(-(1 << 63), (1 << 63) - 1)
_TEXT = st.text(max_size=12)
_SMALL = st.one_of(st.just(0), st.integers(-5, 5))


def _int_or_zero(s: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), s)


receipts = st.builds(
    Receipt,
    kind=st.sampled_from(list(ReceiptKind)),
    node_id=_TEXT,
    task_id=_TEXT,
    attempt=_int_or_zero(_U32),
    fencing_token=_int_or_zero(_U64),
    agent_id=_TEXT,
    lease_id=_TEXT,
    lease_issued_unix_ms=_int_or_zero(_I64),
    lease_expires_unix_ms=_int_or_zero(_I64),
    time_unix_ms=_int_or_zero(_I64),
    seq=_int_or_zero(_U64),
    prev=_TEXT,
    policy_digest=_TEXT,
    tool=_TEXT,
    arguments_sha256=_TEXT,
    result_sha256=_TEXT,
    duration_ms=_int_or_zero(_U32),
    cost_micros=_int_or_zero(_I64),
    status=_TEXT,
    reason=_TEXT,
    final_state=st.integers(0, 9),
    artifact_name=_TEXT,
    artifact_size=_int_or_zero(_U64),
    artifact_sha256=_TEXT,
    idempotency_key=_TEXT,
    memory_key=_TEXT,
    version=_int_or_zero(_U32),
)


@settings(max_examples=300, deadline=None)
@given(receipts)
def test_predicate_equals_protobufs_proto3_json(r: Receipt) -> None:
    """For any receipt, the predicate (keys, order and values) is MessageToDict's."""
    expected = json_format.MessageToDict(to_proto(r))
    got = predicate_of(r)
    assert got == expected
    assert list(got) == list(expected)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("attempt", -1, ValueError),
        ("attempt", 1 << 32, ValueError),
        ("seq", 1 << 64, ValueError),
        ("cost_micros", 1 << 63, ValueError),
        ("tool", 3, TypeError),
        ("attempt", "1", TypeError),
    ],
)
def test_predicate_refuses_what_the_message_refuses(field: str, value: object, error: type) -> None:
    """A value the protobuf message would refuse (type or range) is refused by the encoder too."""
    base = Receipt(ReceiptKind.TOOL_CALL, "n", "t", 1, 1, "a", "L", T0, T0 + 1, T0)
    bad = dataclasses.replace(base, **{field: value})
    with pytest.raises((TypeError, ValueError)):
        to_proto(bad)
    with pytest.raises(error):
        predicate_of(bad)


def test_chained_receipts_keep_their_facts() -> None:
    """Chaining fills node, seq and prev and keeps every other fact of the receipt."""
    key = seeded_key("encoding/n1")
    chain = ReceiptChain("n1", key)
    r = Receipt(ReceiptKind.TOOL_CALL, "", "t", 2, 7, "a", "L", T0, T0 + 5, T0 + 1, tool="x")
    first = chain.sign(r)
    second = chain.sign(r)
    for seq, data in ((1, first), (2, second)):
        _, got = parse_receipt(data)
        assert got == dataclasses.replace(
            r, node_id="n1", seq=seq, prev=got.prev, version=got.version
        )
    assert r.seq == 0
    assert r.node_id == ""
