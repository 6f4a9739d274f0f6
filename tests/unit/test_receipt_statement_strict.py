"""The receipt statement parser the ledger uses at ingest is as strict as the verifier."""

from __future__ import annotations

import json

import pytest

from tether.core.errors import VerificationError
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.receipts import parse_statement, statement_bytes
from tether.verify.builder import T0


def _statement() -> bytes:
    return statement_bytes(
        Receipt(
            kind=ReceiptKind.TOOL_CALL, node_id="n1", task_id="t", attempt=1, fencing_token=1,
            agent_id="a", lease_id="L", lease_issued_unix_ms=T0, lease_expires_unix_ms=T0 + 1,
            time_unix_ms=T0, seq=1, tool="x", status="ok",
        )
    )  # fmt: skip


def test_repeated_key_is_refused() -> None:
    """A statement with a key repeated (two readers could see two receipts) is refused."""
    good = _statement()
    assert parse_statement(good).tool == "x"
    doc = good.decode()
    twice = doc.replace('"predicateType":', '"predicateType":"x","predicateType":', 1)
    assert twice != doc
    with pytest.raises(VerificationError, match="repeated key"):
        parse_statement(twice.encode())


def test_non_finite_numbers_are_refused() -> None:
    """NaN and Infinity are not JSON and are refused."""
    doc = json.loads(_statement())
    doc["predicate"]["costMicros"] = "__NAN__"
    text = json.dumps(doc).replace('"__NAN__"', "NaN")
    with pytest.raises(VerificationError, match="not JSON"):
        parse_statement(text.encode())
