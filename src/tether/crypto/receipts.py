"""The one encoding of a signed receipt: in-toto Statement v1 in a DSSE envelope.

receipt (core dataclass) -> Statement JSON bytes -> DSSE envelope signed by the
node key -> compact DSSE JSON bytes. Those exact bytes are spooled, streamed,
stored as the Merkle leaf and exported; nobody re-encodes them. See
docs/receipts.md for the format, precise enough for a verifier in any language.

Parsing is strict and rejects by default: an unknown version, kind, field or
enum value, a statement whose subject does not match its predicate, or an
inconsistent seq/prev pair is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from tether.core.errors import VerificationError
from tether.core.receipts import RECEIPT_VERSION, ControlReceipt, Receipt, ReceiptKind
from tether.core.states import TERMINAL, State
from tether.core.timeouts import EndReason
from tether.crypto.signing import INTOTO_PAYLOAD_TYPE, Envelope, SigningKey, VerifyKey, pae
from tether.v1 import receipt_pb2

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://tether.dev/receipt/v1"
CONTROL_PREDICATE_TYPE = "https://tether.dev/control-receipt/v1"
TASK_SUBJECT_PREFIX = "task:"
TERMINAL_STATES = frozenset(int(s) for s in TERMINAL)  # from the one transition table

_HEX_DIGEST = re.compile("[0-9a-f]{64}")  # a regex: 3x a set test over the characters
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_I64 = 1 << 63


def envelope_digest(envelope_bytes: bytes) -> str:
    """Hex SHA-256 of exact envelope bytes: what the next receipt's `prev` holds."""
    return hashlib.sha256(envelope_bytes).hexdigest()


def is_hex_digest(s: str) -> bool:
    """True for a lowercase hex SHA-256 (64 characters)."""
    return _HEX_DIGEST.fullmatch(s) is not None


def subject_for(r: Receipt) -> dict[str, Any]:
    """The statement subject: the artifact for artifacts, else the task.

    A task subject is named "task:<task_id>" with the SHA-256 of the UTF-8 task
    id as its digest, so in-toto tools that require a digest get a stable one.
    """
    name, digest = _subject(r)
    return {"name": name, "digest": {"sha256": digest}}


def _subject(r: Receipt) -> tuple[str, str]:
    """The subject's (name, sha256) (see `subject_for`)."""
    if r.kind == ReceiptKind.ARTIFACT:
        return r.artifact_name, r.artifact_sha256
    return TASK_SUBJECT_PREFIX + r.task_id, _task_digest(r.task_id)


def to_proto(r: Receipt) -> receipt_pb2.Receipt:
    """The `tether.v1.Receipt` message for a receipt."""
    fields = dataclasses.asdict(r)
    fields["kind"] = int(r.kind)
    fields["final_state"] = int(r.final_state)
    return receipt_pb2.Receipt(**fields)


# proto3 JSON of `tether.v1.Receipt`, written from the descriptor: fields in number
# order, default values left out, lowerCamelCase names, 64-bit integers as decimal
# strings, enums by name. The same dict `json_format.MessageToDict(to_proto(r))`
# gives (tests/unit/test_receipt_encoding.py proves it), without building a message:
# that took two thirds of the time to sign a receipt.
_P_STR, _P_ENUM, _P_INT, _P_INT64 = range(4)
_I32_KINDS = {
    FieldDescriptor.TYPE_UINT32: (0, _U32),
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
}
_I64_KINDS = {
    FieldDescriptor.TYPE_UINT64: (0, _U64),
    FieldDescriptor.TYPE_INT64: (-_I64, _I64 - 1),
}
_PREDICATE_FIELDS: list[tuple[str, str, int, Any]] = []
for _f in sorted(receipt_pb2.Receipt.DESCRIPTOR.fields, key=lambda f: f.number):
    if _f.type == FieldDescriptor.TYPE_STRING:
        _PREDICATE_FIELDS.append((_f.name, _f.json_name, _P_STR, None))
    elif _f.type == FieldDescriptor.TYPE_ENUM and _f.enum_type is not None:
        _names = {v.number: v.name for v in _f.enum_type.values}
        _PREDICATE_FIELDS.append((_f.name, _f.json_name, _P_ENUM, _names))
    elif _f.type in _I32_KINDS:
        _PREDICATE_FIELDS.append((_f.name, _f.json_name, _P_INT, _I32_KINDS[_f.type]))
    elif _f.type in _I64_KINDS:
        _PREDICATE_FIELDS.append((_f.name, _f.json_name, _P_INT64, _I64_KINDS[_f.type]))
    else:
        raise AssertionError(f"receipt field {_f.name}: no proto3 JSON encoding here")


def predicate_of(r: Receipt) -> dict[str, Any]:
    """The proto3 JSON object of the receipt's `tether.v1.Receipt` (the statement predicate).

    Raises:
        TypeError, ValueError: a field has the wrong type or is out of its range
            (as building the protobuf message would).
    """
    out: dict[str, Any] = {}
    values = r.__dict__
    for name, key, t, extra in _PREDICATE_FIELDS:
        v = values[name]
        if t == _P_STR:
            if type(v) is not str:
                raise TypeError(f"receipt field {name!r} must be a string, not {type(v).__name__}")
            if v:
                out[key] = v
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"receipt field {name!r} must be an integer, not {type(v).__name__}")
        if t == _P_ENUM:
            if v:
                out[key] = extra.get(int(v), int(v))
            continue
        lo, hi = extra
        if not lo <= v <= hi:
            raise ValueError(f"receipt field {name!r}: value {v} out of range")
        if v:
            out[key] = str(int(v)) if t == _P_INT64 else int(v)
    return out


def statement_bytes(r: Receipt) -> bytes:
    """The in-toto Statement v1 JSON bytes (compact) for a receipt."""
    validate(r)
    predicate = predicate_of(r)
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [subject_for(r)],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def sign_receipt(r: Receipt, key: SigningKey) -> bytes:
    """Signs a receipt (seq and prev already set) and returns the envelope bytes."""
    return key.sign_envelope(INTOTO_PAYLOAD_TYPE, statement_bytes(r)).to_json_bytes()


# --- strict proto3-JSON predicate parsing (fast: no protobuf objects) ---------


_KINDS = {v.name: v.number for v in receipt_pb2.DESCRIPTOR.enum_types_by_name["ReceiptKind"].values}
_STATES = {v.name: v.number for v in receipt_pb2.DESCRIPTOR.enum_types_by_name["TaskState"].values}

# proto3 JSON parsers accept the lowerCamelCase name and the proto field name.
_JSON_NAMES: dict[str, str] = {}
for _f in receipt_pb2.Receipt.DESCRIPTOR.fields:
    _JSON_NAMES[_f.json_name] = _f.name
    _JSON_NAMES[_f.name] = _f.name
assert set(_JSON_NAMES.values()) == {f.name for f in dataclasses.fields(Receipt)}, (
    "receipt.proto and tether.core.receipts.Receipt must have the same fields"
)


_STR, _U32T, _U64T, _I64T, _KIND, _STATE = range(6)
_TYPES: dict[str, int] = {
    "version": _U32T,
    "kind": _KIND,
    "seq": _U64T,
    "attempt": _U32T,
    "fencing_token": _U64T,
    "lease_issued_unix_ms": _I64T,
    "lease_expires_unix_ms": _I64T,
    "time_unix_ms": _I64T,
    "duration_ms": _U32T,
    "cost_micros": _I64T,
    "final_state": _STATE,
    "artifact_size": _U64T,
}  # every other field is a string
_TYPES_ALL = tuple(f.name for f in dataclasses.fields(Receipt))
_SPEC: dict[str, tuple[str, int]] = {
    k: (name, _TYPES.get(name, _STR)) for k, name in _JSON_NAMES.items()
}
_RANGES = {_U32T: (0, _U32), _U64T: (0, _U64), _I64T: (-_I64, _I64 - 1)}
_ALL_DEFAULTS: dict[str, Any] = {
    name: ("" if t == _STR else 0) for name, t in ((n, _TYPES.get(n, _STR)) for n in _TYPES_ALL)
}


_RECEIPT_KINDS = {int(k): k for k in ReceiptKind}  # a dict lookup: a fifth of ReceiptKind(n)


def receipt_from_predicate(predicate: Any) -> Receipt:
    """Builds a Receipt from a proto3 JSON predicate object, strictly.

    Raises:
        VerificationError: unknown field, wrong type, or an invalid receipt.
    """
    if type(predicate) is not dict:
        raise VerificationError("receipt predicate is not an object")
    fields: dict[str, Any] = dict(_ALL_DEFAULTS)
    given: set[str] = set()
    for k, v in predicate.items():
        spec = _SPEC.get(k)
        if spec is None:
            raise VerificationError(f"unknown receipt field {k!r}")
        name, t = spec
        if name in given:
            raise VerificationError(f"receipt field {name!r} given twice")
        given.add(name)
        if v is None:
            continue  # proto3 JSON: null means the default value
        tv = type(v)
        if t == _STR:
            if tv is not str:
                raise VerificationError(f"receipt field {name!r}: not a string")
        elif t in _RANGES:
            if tv is str:
                digits = v[1:] if t == _I64T and v[:1] == "-" else v
                if not (digits.isascii() and digits.isdigit()):
                    raise VerificationError(f"receipt field {name!r}: not an integer")
                v = int(v)
            elif tv is not int:
                raise VerificationError(f"receipt field {name!r}: not an integer")
            lo, hi = _RANGES[t]
            if not lo <= v <= hi:
                raise VerificationError(f"receipt field {name!r}: out of range")
        else:
            names = _KINDS if t == _KIND else _STATES
            if tv is str and v in names:
                v = names[v]
            elif not (tv is int and v in names.values()):
                raise VerificationError(f"receipt field {name!r}: unknown enum value {v!r}")
        fields[name] = v
    if fields.get("version", 0) != RECEIPT_VERSION:
        raise VerificationError(f"unsupported receipt version {fields.get('version', 0)}")
    kind = fields["kind"]
    if kind == 0:
        raise VerificationError("receipt kind is unspecified")
    fields["kind"] = _RECEIPT_KINDS.get(kind) or ReceiptKind(kind)
    # Every field is set and typed above; filling __dict__ skips the frozen
    # dataclass's per-field object.__setattr__, a third of the parse time.
    r = object.__new__(Receipt)
    r.__dict__.update(fields)
    validate(r)
    return r


# The canonical statement (what `statement_bytes` writes: compact, predicate fields in
# number order, defaults left out, strings without escapes) as one regular expression,
# built from the same field table as the writer. Verifying a bundle parses 100,000s of
# statements; this grammar takes the common form in one C-speed match instead of a JSON
# parse with a Python hook per object and a generic loop over the fields.
# A string is anything up to the next quote: the statement as a whole holds no
# backslash and no control byte (`_NOT_IN_FAST`), so each is a JSON string
# without escapes, whose text is its value. (A scan to one byte costs a fraction
# of a regex character class.)
_FAST_CHARS = r'[^"]*'
_NOT_IN_FAST = bytes(range(0x20)) + b"\\"
_FAST_MEMBERS: list[str] = []
_FAST_INTS: list[str] = []
for _i, (_name, _key, _t, _extra) in enumerate(_PREDICATE_FIELDS):
    if _t == _P_STR:
        _value = f'"(?P<{_name}>{_FAST_CHARS})"'
    elif _t == _P_ENUM:
        _value = f'"(?P<{_name}>[A-Z][A-Z0-9_]*)"'
    else:
        # Integers with one digit fewer than the type's bound: every one is in range
        # (the strict parser checks, and names, anything longer).
        _lo, _hi = _extra
        _digits = f"{'-?' if _lo < 0 else ''}[1-9][0-9]{{0,{len(str(_hi)) - 2}}}"
        _value = f"(?P<{_name}>0|{_digits})" if _t == _P_INT else f'"(?P<{_name}>0|{_digits})"'
        _FAST_INTS.append(_name)
    _member = f'"{_key}":{_value}'
    # The first field (version, never 0 in a valid receipt) is always written.
    _FAST_MEMBERS.append(_member if _i == 0 else f"(?:,{_member})?")
_FAST_STATEMENT = re.compile(
    r'\{"_type":"'
    + re.escape(STATEMENT_TYPE)
    + r'","subject":\[\{"name":"('
    + _FAST_CHARS
    + r')","digest":\{"sha256":"('
    + _FAST_CHARS
    + r')"\}\}\],"predicateType":"'
    + re.escape(PREDICATE_TYPE)
    + r'","predicate":\{'
    + "".join(_FAST_MEMBERS)
    + r"\}\}"
)
FAST_STATEMENT_DEPTH = 4
"""How deep the statements `parse_canonical_statement` takes nest ({[{{}}]})."""
_FAST_ENUMS = (("kind", _KINDS), ("final_state", _STATES))


def parse_canonical_statement(payload: bytes) -> Receipt | None:
    """The receipt of a statement in its canonical form, or None for any other bytes.

    Everything it accepts is strict JSON (no repeated key, no escape, no control
    byte, valid UTF-8, nesting `FAST_STATEMENT_DEPTH` deep) that a strict parser
    followed by `receipt_from_predicate` and the subject check reads as the same
    receipt. None means "not this form, or something is wrong": the caller then
    takes the general parser, which accepts or names what is wrong as before.

    Raises:
        VerificationError: the receipt's own invariants (`validate`), with the
            message the general parser gives for the same receipt.
    """
    if len(payload.translate(None, _NOT_IN_FAST)) != len(payload):
        return None
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return None
    m = _FAST_STATEMENT.fullmatch(text)
    if m is None:
        return None
    fields: dict[str, Any] = m.groupdict("")
    for name in _FAST_INTS:
        s = fields[name]
        fields[name] = int(s) if s else 0
    for name, table in _FAST_ENUMS:
        s = fields[name]
        if s:
            number = table.get(s)
            if number is None:
                return None
            fields[name] = number
        else:
            fields[name] = 0
    kind = _RECEIPT_KINDS.get(fields["kind"])
    if kind is None or fields["version"] != RECEIPT_VERSION:
        return None
    fields["kind"] = kind
    r = object.__new__(Receipt)
    r.__dict__.update(fields)
    validate(r)
    if (m[1], m[2]) != _subject(r):
        return None
    return r


def validate(r: Receipt) -> None:
    """Checks a receipt's own invariants (the chain's are the verifier's).

    Raises:
        VerificationError: the receipt cannot be valid.
    """
    if r.version != RECEIPT_VERSION:
        raise VerificationError(f"unsupported receipt version {r.version}")
    if not isinstance(r.kind, ReceiptKind):
        raise VerificationError(f"unknown receipt kind {r.kind!r}")
    if not r.node_id or not r.task_id:
        raise VerificationError("receipt needs node_id and task_id")
    if r.seq < 1:
        raise VerificationError("receipt seq must start at 1")
    if (r.seq == 1) != (r.prev == ""):
        raise VerificationError("prev must be empty exactly when seq is 1")
    if r.prev and not is_hex_digest(r.prev):
        raise VerificationError("prev is not a hex sha256")
    for name in ("policy_digest", "arguments_sha256", "result_sha256", "artifact_sha256"):
        value = getattr(r, name)
        if value and not is_hex_digest(value):
            raise VerificationError(f"{name} is not a hex sha256")
    if r.kind == ReceiptKind.TASK_FINISHED:
        # queued: a failed attempt the task's retry policy retries (status "error").
        retried = r.final_state == int(State.QUEUED) and r.status == "error"
        if r.final_state not in TERMINAL_STATES and not retried:
            raise VerificationError(
                "task_finished needs a terminal final_state (or queued for a retried failure)"
            )
    elif r.final_state != 0:
        raise VerificationError("final_state is only for task_finished")
    if r.kind == ReceiptKind.ARTIFACT and not (r.artifact_name and r.artifact_sha256):
        raise VerificationError("artifact receipt needs artifact_name and artifact_sha256")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"repeated key {key[:64]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_statement(payload: bytes) -> Receipt:
    """Parses and checks an in-toto Statement carrying a Tether receipt.

    Raises:
        VerificationError: not a Tether receipt statement, or invalid.
    """
    try:
        # Strict like the verifier: a repeated key or a non-finite number is refused
        # here too, so the ledger never accepts a statement `tether verify` rejects.
        doc = json.loads(payload, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # deep nesting: RecursionError
        raise VerificationError(f"statement is not JSON: {str(err)[:200]}") from err
    if not isinstance(doc, dict) or set(doc) != {
        "_type",
        "subject",
        "predicateType",
        "predicate",
    }:
        raise VerificationError(
            "statement must hold exactly _type, subject, predicateType, predicate"
        )
    if doc["_type"] != STATEMENT_TYPE:
        raise VerificationError(f"statement _type {doc['_type']!r} is not in-toto Statement v1")
    if doc["predicateType"] != PREDICATE_TYPE:
        raise VerificationError(f"predicateType {doc['predicateType']!r} is not a Tether receipt")
    r = receipt_from_predicate(doc["predicate"])
    if doc["subject"] != [subject_for(r)]:
        raise VerificationError("statement subject does not match the receipt")
    return r


def parse_receipt(envelope_bytes: bytes) -> tuple[Envelope, Receipt]:
    """Parses envelope bytes into (envelope, receipt) without checking the signature.

    Also requires the bytes to be the canonical compact DSSE JSON form, so one
    receipt has one byte encoding (its Merkle leaf and chain digest).

    Raises:
        VerificationError: malformed envelope or statement, or not canonical.
    """
    env = Envelope.from_json_bytes(envelope_bytes)
    if env.payload_type != INTOTO_PAYLOAD_TYPE:
        raise VerificationError(f"payload type {env.payload_type!r} is not in-toto")
    if env.to_json_bytes() != envelope_bytes:
        raise VerificationError("envelope is not in canonical compact DSSE JSON form")
    return env, parse_statement(env.payload)


def verify_receipt(envelope_bytes: bytes, key: VerifyKey) -> Receipt:
    """Parses a receipt envelope and checks it was signed by `key`.

    Raises:
        VerificationError: malformed, or no valid signature by `key`.
    """
    env, r = parse_receipt(envelope_bytes)
    message = pae(env.payload_type, env.payload)
    if not any(kid == key.keyid and key.verify(sig, message) for kid, sig in env.signatures):
        raise VerificationError(f"receipt {r.node_id}/{r.seq} is not signed by node key")
    return r


class ReceiptChain:
    """Assigns per-node `seq` (from 1) and `prev` (digest of the last envelope) and signs.

    Restore it after a restart with the last stored seq and envelope digest.
    """

    def __init__(
        self, node_id: str, key: SigningKey, last_seq: int = 0, last_digest: str = ""
    ) -> None:
        if (last_seq == 0) != (last_digest == ""):
            raise ValueError("last_digest must be empty exactly when last_seq is 0")
        self.node_id = node_id
        self._key = key
        self.last_seq = last_seq
        self.last_digest = last_digest

    def sign(self, receipt: Receipt) -> bytes:
        """Chains and signs `receipt`; returns the envelope bytes.

        Raises:
            ValueError: the receipt names another node.
            VerificationError: the receipt is invalid.
        """
        if receipt.node_id and receipt.node_id != self.node_id:
            raise ValueError(f"receipt names node {receipt.node_id!r}, chain is {self.node_id!r}")
        # dataclasses.replace, without re-running the frozen dataclass's __init__ (the
        # receipt is validated as it is encoded).
        chained = object.__new__(Receipt)
        chained.__dict__.update(
            receipt.__dict__, node_id=self.node_id, seq=self.last_seq + 1, prev=self.last_digest
        )
        data = sign_receipt(chained, self._key)
        self.last_seq += 1
        self.last_digest = envelope_digest(data)
        return data


# --- control receipts: the same statement form, signed by the control plane ----------

_CONTROL_JSON: dict[str, tuple[str, int]] = {}
for _f in receipt_pb2.ControlReceipt.DESCRIPTOR.fields:
    _t = {
        "version": _U32T,
        "end_reason": _KIND,
        "attempt": _U32T,
        "fencing_token": _U64T,
        "limit_unix_ms": _I64T,
        "time_unix_ms": _I64T,
        "state": _STATE,
    }.get(_f.name, _STR)
    _CONTROL_JSON[_f.json_name] = _CONTROL_JSON[_f.name] = (_f.name, _t)
assert {n for n, _ in _CONTROL_JSON.values()} == {
    f.name for f in dataclasses.fields(ControlReceipt)
}, "receipt.proto and tether.core.receipts.ControlReceipt must have the same fields"
_END_REASONS = {
    v.name: v.number for v in receipt_pb2.DESCRIPTOR.enum_types_by_name["EndReason"].values
}
# The ends a control receipt records (the holder's own are node receipts), and
# which of them always end a live lease, never do, or may.
CONTROL_END_REASONS = frozenset(
    {
        EndReason.HEARTBEAT_TIMEOUT,
        EndReason.ATTEMPT_TIMEOUT,
        EndReason.SCHEDULE_TO_START_TIMEOUT,
        EndReason.DEADLINE,
        EndReason.CANCELED,
        EndReason.RELEASED,
    }
)
_ENDS_A_LEASE = frozenset(
    {EndReason.HEARTBEAT_TIMEOUT, EndReason.ATTEMPT_TIMEOUT, EndReason.RELEASED}
)
_NO_LEASE = frozenset({EndReason.SCHEDULE_TO_START_TIMEOUT})
# The state each end leaves a task in (None: queued again, or expired when spent).
_END_STATE = {
    EndReason.CANCELED: State.CANCELED,
    EndReason.DEADLINE: State.EXPIRED,
    EndReason.SCHEDULE_TO_START_TIMEOUT: State.EXPIRED,
}


def control_statement_bytes(c: ControlReceipt) -> bytes:
    """The in-toto Statement v1 JSON bytes (compact) of a control receipt."""
    validate_control(c)
    fields = dataclasses.asdict(c)
    fields["end_reason"] = int(c.end_reason)
    predicate = json_format.MessageToDict(receipt_pb2.ControlReceipt(**fields))
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [_task_subject(c.task_id)],
        "predicateType": CONTROL_PREDICATE_TYPE,
        "predicate": predicate,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def sign_control_receipt(c: ControlReceipt, key: SigningKey) -> bytes:
    """Signs a control receipt with the control plane's key; returns the envelope bytes."""
    return key.sign_envelope(INTOTO_PAYLOAD_TYPE, control_statement_bytes(c)).to_json_bytes()


def _task_subject(task_id: str) -> dict[str, Any]:
    return {"name": TASK_SUBJECT_PREFIX + task_id, "digest": {"sha256": _task_digest(task_id)}}


@functools.lru_cache(maxsize=4096)
def _task_digest(task_id: str) -> str:
    """Hex SHA-256 of a task id (a task's receipts come together: one hash per task)."""
    return hashlib.sha256(task_id.encode()).hexdigest()


def validate_control(c: ControlReceipt) -> None:
    """Checks a control receipt's own invariants.

    Raises:
        VerificationError: the control receipt cannot be valid.
    """
    if c.version != RECEIPT_VERSION:
        raise VerificationError(f"unsupported control receipt version {c.version}")
    if c.end_reason not in CONTROL_END_REASONS:
        raise VerificationError(f"end reason {c.end_reason!r} is not the control plane's")
    reason = EndReason(c.end_reason)
    if not c.task_id:
        raise VerificationError("control receipt needs task_id")
    want = _END_STATE.get(reason)
    if want is not None and c.state != int(want):
        raise VerificationError(f"{reason.label} must leave the task {want.name.lower()}")
    if want is None and c.state not in (int(State.QUEUED), int(State.EXPIRED)):
        raise VerificationError(f"{reason.label} must leave the task queued or expired")
    if c.lease_id:
        if not (c.node_id and c.agent_id and c.fencing_token):
            raise VerificationError("a control receipt ending a lease names its holder and token")
        if reason in _NO_LEASE:
            raise VerificationError(f"{reason.label} ends no lease")
    elif c.node_id or c.agent_id:
        raise VerificationError("holder fields without a lease_id")
    elif reason in _ENDS_A_LEASE:
        raise VerificationError(f"{reason.label} must name the lease it ended")


def control_receipt_from_predicate(predicate: Any) -> ControlReceipt:
    """Builds a ControlReceipt from its proto3 JSON predicate, strictly.

    Raises:
        VerificationError: unknown or repeated field, wrong type, or invalid.
    """
    if type(predicate) is not dict:
        raise VerificationError("control receipt predicate is not an object")
    fields: dict[str, Any] = {name: ("" if t == _STR else 0) for name, t in _CONTROL_JSON.values()}
    given: set[str] = set()
    for k, v in predicate.items():
        spec = _CONTROL_JSON.get(k)
        if spec is None:
            raise VerificationError(f"unknown control receipt field {k!r}")
        name, t = spec
        if name in given:
            raise VerificationError(f"control receipt field {name!r} given twice")
        given.add(name)
        if v is None:
            continue
        tv = type(v)
        if t == _STR:
            if tv is not str:
                raise VerificationError(f"control receipt field {name!r}: not a string")
        elif t in _RANGES:
            if tv is str:
                digits = v[1:] if t == _I64T and v[:1] == "-" else v
                if not (digits.isascii() and digits.isdigit()):
                    raise VerificationError(f"control receipt field {name!r}: not an integer")
                v = int(v)
            elif tv is not int:
                raise VerificationError(f"control receipt field {name!r}: not an integer")
            lo, hi = _RANGES[t]
            if not lo <= v <= hi:
                raise VerificationError(f"control receipt field {name!r}: out of range")
        else:
            names = _END_REASONS if t == _KIND else _STATES
            if tv is str and v in names:
                v = names[v]
            elif not (tv is int and v in names.values()):
                raise VerificationError(f"control receipt field {name!r}: unknown enum value {v!r}")
        fields[name] = v
    if fields["version"] != RECEIPT_VERSION:
        raise VerificationError(f"unsupported control receipt version {fields['version']}")
    if fields["end_reason"] == 0:
        raise VerificationError("control receipt end_reason is unspecified")
    fields["end_reason"] = EndReason(fields["end_reason"])
    c = ControlReceipt(**fields)
    validate_control(c)
    return c


def parse_control_statement(doc: Any) -> ControlReceipt:
    """Checks a parsed statement (a JSON object) carrying a control receipt.

    The caller parses the JSON (strictly) and checks the control plane's
    signature over the exact payload bytes first.

    Raises:
        VerificationError: not a control receipt statement, or invalid.
    """
    if type(doc) is not dict or doc.keys() != {"_type", "subject", "predicateType", "predicate"}:
        raise VerificationError(
            "statement must hold exactly _type, subject, predicateType, predicate"
        )
    if doc["_type"] != STATEMENT_TYPE:
        raise VerificationError("statement _type is not in-toto Statement v1")
    if doc["predicateType"] != CONTROL_PREDICATE_TYPE:
        raise VerificationError("statement predicateType is not a Tether control receipt")
    c = control_receipt_from_predicate(doc["predicate"])
    if doc["subject"] != [_task_subject(c.task_id)]:
        raise VerificationError("statement subject does not match the control receipt")
    return c
