"""Request generation and a runner for the gRPC fuzzing suite (not a test module).

Requests come from the services' proto descriptors: structured random messages
(field values drawn from extremes, garbage and a pool of plausible values so
calls get past validation), valid messages with their bytes mutated, raw random
bytes, invalid UTF-8 in string fields, wrong wire types, unknown fields and
deep nesting written straight on the wire, and streams of such messages in
any order. Every request is sent as bytes through a generic callable
(`request_serializer=None`), so undecodable payloads reach the server.

TETHER_FUZZ_SEED replays a run, TETHER_FUZZ_REQUESTS sets the requests per
server, and TETHER_FUZZ_DEBUG=1 prints every request's kind, RPC and status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

FD = d.FieldDescriptor

DEFAULT_REQUESTS = 2_000
CALL_TIMEOUT_S = 3.0
CONCURRENCY = 24
HEALTH_TIMEOUT_S = 2.0
HEALTH_INTERVAL_S = 0.1
FORBIDDEN = ("UNKNOWN", "INTERNAL")


def fuzz_seed() -> int:
    """TETHER_FUZZ_SEED, else one from the clock (printed on failure to replay the run)."""
    given = os.environ.get("TETHER_FUZZ_SEED")
    return int(given) if given else time.time_ns() % (1 << 32)


def fuzz_requests() -> int:
    """TETHER_FUZZ_REQUESTS (requests per server), default 2,000 (the CI mode)."""
    return int(os.environ.get("TETHER_FUZZ_REQUESTS", DEFAULT_REQUESTS))


# -- the wire format, for what the protobuf API will not write -----------------------------


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int (negative ints as their 64-bit two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


INVALID_UTF8 = (
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"ok\xe2\x82",
    b"\x80",
)


# -- values ---------------------------------------------------------------------------------

INT_EXTREMES: Mapping[int, Sequence[int]] = {
    FD.TYPE_INT32: (0, 1, -1, 2**31 - 1, -(2**31)),
    FD.TYPE_SINT32: (0, 1, -1, 2**31 - 1, -(2**31)),
    FD.TYPE_SFIXED32: (0, 1, -1, 2**31 - 1, -(2**31)),
    FD.TYPE_UINT32: (0, 1, 2**31 - 1, 2**31, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 1, 2**32 - 1),
    FD.TYPE_INT64: (0, 1, -1, 2**31, 2**53, 2**63 - 1, -(2**63), -(2**63) + 1),
    FD.TYPE_SINT64: (0, 1, -1, 2**63 - 1, -(2**63)),
    FD.TYPE_SFIXED64: (0, 1, -1, 2**63 - 1, -(2**63)),
    FD.TYPE_UINT64: (0, 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 1, 2**63, 2**64 - 1),
}
INT_RANGE: Mapping[int, tuple[int, int]] = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
WEIRD_STRINGS = (
    "",
    " ",
    "..",
    "../../etc/passwd",
    "a" * 129,
    "x" * 257,
    "ünï©ødé",
    "\x00",
    "\n\r\t",
    "%s%n",
    "'; DROP TABLE tasks; --",
    "🙂" * 40,
    "\u202e",
    "-1",
    "18446744073709551615",
    "null",
    "{}",
    "[]",
    '{"a": 1e999}',
    "[" * 600,
)


@dataclass
class Pool:
    """Plausible values by field name, so some requests pass validation and go deep."""

    strings: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    ints: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    bytes_: dict[str, list[bytes]] = field(default_factory=lambda: collections.defaultdict(list))
    keep: int = 8
    exclude: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    """(method, field) -> pool strings never sent there (e.g. revoking the fuzzer's own node)."""

    def add(self, name: str, value: str | int | bytes) -> None:
        bucket: list[Any]
        if isinstance(value, bytes):
            bucket = self.bytes_[name]
        elif isinstance(value, int):
            bucket = self.ints[name]
        else:
            bucket = self.strings[name]
        if value not in bucket:
            bucket.append(value)
            if len(bucket) > self.keep:
                del bucket[0]  # the newest are the live ones (tasks, leases)


class Generator:
    """Random requests for the methods of some services, from one seeded RNG."""

    def __init__(self, rng: random.Random, pool: Pool, max_depth: int = 4) -> None:
        self.rng = rng
        self.pool = pool
        self.max_depth = max_depth
        self.method = ""  # the RPC being generated for (for `Pool.exclude`)
        self.plausible = False  # pool values and valid enums wherever there are some

    # -- scalar values ------------------------------------------------------------------

    def text(self, name: str) -> str:
        rng = self.rng
        roll = rng.random()
        known = self.pool.strings.get(name)
        excluded = self.pool.exclude.get((self.method, name))
        if excluded and known:
            known = [k for k in known if k not in excluded]
        if known and (roll < 0.55 or self.plausible):
            return rng.choice(known)
        if self.plausible and rng.random() < 0.8:
            return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 12)))
        if roll < 0.7:
            return rng.choice(WEIRD_STRINGS)
        if roll < 0.75:
            return rng.choice(string.ascii_letters) * rng.choice((1024, 5000, 70_000))
        if roll < 0.9:
            alphabet = string.ascii_letters + string.digits + "._-:"
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        chars = (
            chr(rng.choice((rng.randint(32, 126), rng.randint(0xA0, 0xD7FF)))) for _ in range(64)
        )
        return "".join(chars)[: rng.randint(0, 64)]

    def blob(self, name: str) -> bytes:
        rng = self.rng
        known = self.pool.bytes_.get(name)
        roll = rng.random()
        if known and (roll < 0.4 or self.plausible):
            return rng.choice(known)
        if roll < 0.5:
            return b""
        if roll < 0.55:
            return rng.randbytes(rng.choice((32, 1 << 16, (1 << 20) + 1)))
        return rng.randbytes(rng.randint(0, 200))

    def integer(self, fd: d.FieldDescriptor, extreme: bool) -> int:
        rng = self.rng
        known = self.pool.ints.get(fd.name)
        if known and not extreme and (rng.random() < 0.5 or self.plausible):
            return rng.choice(known)
        if self.plausible and rng.random() < 0.8:
            return rng.randint(1, 1000)
        if extreme or rng.random() < 0.4:
            return rng.choice(INT_EXTREMES[fd.type])
        lo, hi = INT_RANGE[fd.type]
        if rng.random() < 0.5:
            return max(lo, min(hi, rng.randint(-5, 100_000)))
        return rng.randint(lo, hi)

    def enum(self, fd: d.FieldDescriptor, extreme: bool) -> int:
        values = [v.number for v in fd.enum_type.values]
        if extreme or (self.rng.random() < 0.2 and not self.plausible):
            return self.rng.choice((0, -1, 99, 2**31 - 1, -(2**31), max(values) + 1))
        if self.plausible:
            return self.rng.choice([v for v in values if v] or values)
        return self.rng.choice(values)

    # -- messages -----------------------------------------------------------------------

    def message(self, desc: d.Descriptor, *, extreme: bool = False, depth: int = 0) -> Any:
        """A message of type `desc` with random fields set (valid protobuf, any values)."""
        cls = message_factory.GetMessageClass(desc)
        msg = cls()
        rng = self.rng
        oneofs_done: set[str] = set()
        for fd in desc.fields:
            if fd.containing_oneof is not None:
                if fd.containing_oneof.name in oneofs_done or rng.random() < 0.5:
                    continue
                oneofs_done.add(fd.containing_oneof.name)
            elif rng.random() < (0.02 if self.plausible else 0.15):
                continue  # left unset
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                target = getattr(msg, fd.name)
                for _ in range(rng.randint(0, 3)):
                    key_fd = fd.message_type.fields_by_name["key"]
                    value_fd = fd.message_type.fields_by_name["value"]
                    key = self.scalar(key_fd, extreme)
                    if value_fd.message_type is not None:
                        if depth < self.max_depth:
                            target[key].CopyFrom(
                                self.message(
                                    value_fd.message_type, extreme=extreme, depth=depth + 1
                                )
                            )
                    else:
                        target[key] = self.scalar(value_fd, extreme)
                continue
            if fd.is_repeated:
                container = getattr(msg, fd.name)
                count = rng.choice((0, 1, 2, 3, 10)) if rng.random() < 0.95 else 2000
                for _ in range(count):
                    if fd.message_type is not None:
                        if depth < self.max_depth:
                            container.add().CopyFrom(
                                self.message(fd.message_type, extreme=extreme, depth=depth + 1)
                            )
                    else:
                        container.append(self.scalar(fd, extreme))
                continue
            if fd.message_type is not None:
                if depth < self.max_depth:
                    getattr(msg, fd.name).CopyFrom(
                        self.message(fd.message_type, extreme=extreme, depth=depth + 1)
                    )
                continue
            setattr(msg, fd.name, self.scalar(fd, extreme))
        return msg

    def scalar(self, fd: d.FieldDescriptor, extreme: bool) -> Any:
        if fd.type == FD.TYPE_STRING:
            return self.text(fd.name)
        if fd.type == FD.TYPE_BYTES:
            return self.blob(fd.name)
        if fd.type == FD.TYPE_BOOL:
            return self.rng.random() < 0.5
        if fd.type == FD.TYPE_ENUM:
            return self.enum(fd, extreme)
        if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return self.rng.choice((0.0, -1.0, 1e308, float("nan"), float("inf")))
        return self.integer(fd, extreme)

    # -- payloads -----------------------------------------------------------------------

    def payload(self, desc: d.Descriptor) -> tuple[str, bytes]:
        """(kind, bytes) of one request message of type `desc`, valid or not."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.2:
            self.plausible = True
            try:
                return "plausible", self.message(desc).SerializeToString()
            finally:
                self.plausible = False
        if roll < 0.35:
            return "structured", self.message(desc).SerializeToString()
        if roll < 0.5:
            return "extreme", self.message(desc, extreme=True).SerializeToString()
        if roll < 0.7:
            return "mutated", self.mutate(self.message(desc).SerializeToString())
        if roll < 0.82:
            return "raw", rng.randbytes(rng.choice((0, 1, 2, 5, 16, 100, 1000, 5000)))
        if roll < 0.92:
            return "bad-utf8", self.bad_utf8(desc)
        return "wire", self.wire_confusion(desc)

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            if op == 0 and buf:  # flip bits
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1 and buf:  # truncate
                del buf[rng.randrange(len(buf)) :]
            elif op == 2:  # insert random bytes
                i = rng.randint(0, len(buf))
                buf[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op == 3 and buf:  # duplicate a slice
                i = rng.randrange(len(buf))
                j = rng.randint(i, len(buf))
                buf[j:j] = buf[i:j]
            elif op == 4 and buf:  # set a byte to an interesting value
                buf[rng.randrange(len(buf))] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
            else:  # append an overlong varint
                buf += b"\xff" * rng.randint(1, 12)
        return bytes(buf)

    def bad_utf8(self, desc: d.Descriptor) -> bytes:
        """A valid message plus a string field holding invalid UTF-8 (proto3 refuses it)."""
        base = self.message(desc).SerializeToString()
        strings = _string_fields(desc)
        if not strings:
            return base + length_delimited(self.rng.randint(1, 30), self.rng.choice(INVALID_UTF8))
        path = self.rng.choice(strings)
        payload = length_delimited(path[-1], b"prefix" + self.rng.choice(INVALID_UTF8))
        for number in reversed(path[:-1]):  # inside the enclosing message fields
            payload = length_delimited(number, payload)
        return base + payload

    def wire_confusion(self, desc: d.Descriptor) -> bytes:
        """Known field numbers with the wrong wire type, unknown fields, deep nesting."""
        rng = self.rng
        numbers = [f.number for f in desc.fields] or [1]
        out = bytearray(self.message(desc).SerializeToString())
        op = rng.randrange(5)
        if op == 0:  # a varint field sent length-delimited, or the other way round
            out += tag(rng.choice(numbers), rng.choice((0, 1, 2, 5))) + rng.randbytes(9)
        elif op == 1:  # unknown fields, including the largest field number
            out += length_delimited(rng.choice((999, 2**29 - 1)), rng.randbytes(10))
            out += tag(rng.choice((100, 5000)), 0) + varint(2**64 - 1)
        elif op == 2:  # group wire types (start/end group), not in proto3
            out += tag(rng.choice(numbers), 3) + tag(rng.choice(numbers), 4)
        elif op == 3:  # deep nesting through the first message-typed field
            msg_fields = [f for f in desc.fields if f.type == FD.TYPE_MESSAGE]
            if msg_fields:
                nested = b""
                f = msg_fields[0]
                for _ in range(rng.choice((50, 101, 200, 2000))):
                    nested = length_delimited(f.number, nested)
                out += nested
            else:
                out += length_delimited(numbers[0], b"\x0a" * 300)
        else:  # a length past the end
            out += tag(rng.choice(numbers), 2) + varint(rng.choice((2**31, 2**63, 100)))
        return bytes(out)


def _string_fields(desc: d.Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths to string fields (through singular message fields)."""
    out: list[tuple[int, ...]] = []
    for f in desc.fields:
        if f.type == FD.TYPE_STRING:
            out.append((f.number,))
        elif f.type == FD.TYPE_MESSAGE and depth < 3 and not f.message_type.GetOptions().map_entry:
            out += [(f.number, *p) for p in _string_fields(f.message_type, depth + 1)]
    return out


def junk_metadata(rng: random.Random, keys: Sequence[str]) -> list[tuple[str, str | bytes]]:
    """Metadata a client may legally send but no server should trust."""
    out: list[tuple[str, str | bytes]] = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.4 and keys:
            key = rng.choice(keys)
            value = rng.choice(("", " ", "x" * 4000, "Bearer x", "token token", "é".encode().hex()))
            out.append((key, value))
        elif roll < 0.6:
            out.append((f"x-junk-{rng.randrange(100)}-bin", rng.randbytes(rng.randint(0, 64))))
        elif roll < 0.8:
            out.append(("authorization", "Basic " + "A" * rng.randint(0, 100)))
        else:
            out.append(("x-tether-" + rng.choice(("node", "agent", "role")), "admin"))
    return out


# -- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One RPC, as the fuzzer calls it."""

    path: str
    input: d.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def methods_of(service: d.ServiceDescriptor) -> list[Method]:
    return [
        Method(
            f"/{service.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming
        )
        for m in service.methods
    ]


@dataclass
class Outcome:
    """Counts of one run, and examples of what must not happen."""

    sent: int = 0
    by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    by_method: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    forbidden: list[str] = field(default_factory=list)
    health_checks: int = 0
    health_failures: list[str] = field(default_factory=list)
    health_max_s: float = 0.0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        codes = ", ".join(f"{k}={v}" for k, v in sorted(self.by_code.items()))
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.by_kind.items()))
        return (
            f"{self.sent} requests in {self.elapsed_s:.1f}s [{codes}] kinds [{kinds}]; "
            f"health {self.health_checks} checks, slowest {self.health_max_s * 1000:.0f} ms, "
            f"{len(self.health_failures)} failed\n"
            + "\n".join(
                f"  {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items()))
                for name, codes in sorted(self.by_method.items())
            )
        )


@dataclass
class Caller:
    """A principal: a channel and the metadata it sends."""

    name: str
    channel: grpc.aio.Channel
    sync_channel: grpc.Channel | None = None  # for streaming RPCs (see `_stream_sync`)
    metadata: tuple[tuple[str, str], ...] = ()
    only: frozenset[str] | None = None  # methods worth calling as this principal
    weight: float = 1.0  # how often this principal calls, relative to the others


async def _unary(caller: Caller, method: Method, data: bytes, metadata: Any) -> tuple[str, str]:
    try:
        if method.server_streaming:  # one request, a stream of replies (read to the end)
            stream = caller.channel.unary_stream(
                method.path, request_serializer=None, response_deserializer=None
            )
            async for _ in stream(data, metadata=metadata, timeout=CALL_TIMEOUT_S):
                pass
            return "OK", ""
        call = caller.channel.unary_unary(
            method.path, request_serializer=None, response_deserializer=None
        )
        await call(data, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        return str(err.code().name), err.details() or ""
    except Exception as err:  # refused by the client library before anything was sent
        return f"CLIENT-{type(err).__name__}", str(err)[:200]
    return "OK", ""


def _stream_sync(
    channel: grpc.Channel, method: Method, messages: list[bytes], metadata: Any
) -> tuple[str, str]:
    """One streaming call on a blocking channel; returns the server's status.

    Blocking, not asyncio: when a server ends a call while requests are still being
    sent, grpcio's asyncio client reports its own INTERNAL "Internal error from
    Core" (its failed send, not the server's answer); the blocking client stops
    sending and reports the status the server sent.
    """
    if method.server_streaming:
        call = channel.stream_stream(
            method.path, request_serializer=None, response_deserializer=None
        )
    else:
        call = channel.stream_unary(
            method.path, request_serializer=None, response_deserializer=None
        )
    try:
        result = call(iter(messages), metadata=metadata, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as err:
        code = err.code()
        return str(code.name), err.details() or ""
    except Exception as err:
        return f"CLIENT-{type(err).__name__}", str(err)[:200]
    return "OK", ""


async def _stream(
    caller: Caller, method: Method, messages: list[bytes], metadata: Any
) -> tuple[str, str]:
    assert caller.sync_channel is not None, f"{caller.name} needs a blocking channel for streams"
    return await asyncio.to_thread(_stream_sync, caller.sync_channel, method, messages, metadata)


async def run_fuzz(
    *,
    seed: int,
    requests: int,
    methods: Sequence[Method],
    callers: Sequence[Caller],
    pool: Pool,
    health: grpc.aio.Channel,
    metadata_keys: Sequence[str] = (),
    stream_builder: Callable[[Generator, Method], tuple[str, list[bytes]]] | None = None,
    refresh: Callable[[int], Any] | None = None,
    refresh_every: int = 100,
) -> Outcome:
    """Sends `requests` generated requests (CONCURRENCY at a time) while health is probed."""
    rng = random.Random(seed)
    gen = Generator(rng, pool)
    outcome = Outcome()
    stop = asyncio.Event()
    health_stub = health_pb2_grpc.HealthStub(health)

    async def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                reply = await health_stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
                )
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    outcome.health_failures.append(f"status {reply.status}")
            except grpc.aio.AioRpcError as err:
                outcome.health_failures.append(f"{err.code().name}: {err.details()}")
            outcome.health_max_s = max(outcome.health_max_s, time.monotonic() - t0)
            outcome.health_checks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEALTH_INTERVAL_S)

    plan: list[tuple[Caller, Method, str, Any, Any]] = []
    for _ in range(requests):
        caller = rng.choices(callers, weights=[c.weight for c in callers])[0]
        candidates = [m for m in methods if caller.only is None or m.name in caller.only]
        method = rng.choice(candidates)
        gen.method = method.name
        metadata: list[tuple[str, str | bytes]] = list(caller.metadata)
        if rng.random() < 0.2:
            junk = junk_metadata(rng, metadata_keys)
            metadata = junk if rng.random() < 0.5 else metadata + junk
        if method.client_streaming:
            if stream_builder is not None and rng.random() < 0.5:
                kind, messages = stream_builder(gen, method)
            else:
                kind = "stream"
                messages = [gen.payload(method.input)[1] for _ in range(rng.choice((0, 1, 2, 5)))]
            plan.append((caller, method, kind, messages, tuple(metadata)))
        else:
            kind, data = gen.payload(method.input)
            plan.append((caller, method, kind, data, tuple(metadata)))

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(plan)):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if refresh is not None and i % refresh_every == 0:
                await refresh(i)
            caller, method, kind, body, metadata = plan[i]
            if method.client_streaming:
                code, details = await _stream(caller, method, body, metadata)
            else:
                code, details = await _unary(caller, method, body, metadata)
            outcome.sent += 1
            outcome.by_code[code] += 1
            outcome.by_kind[kind] += 1
            outcome.by_method[method.name][code] += 1
            if os.environ.get("TETHER_FUZZ_DEBUG"):
                print("DEBUG", kind, method.name, caller.name, code, details[:120])
            if code in FORBIDDEN:
                outcome.forbidden.append(
                    f"#{i} {method.name} as {caller.name} ({kind}): {code} {details[:200]!r}"
                )

    prober = asyncio.create_task(probe())
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        outcome.elapsed_s = time.monotonic() - t0
        stop.set()
        await prober
    return outcome


class TracebackCounter(logging.Handler):
    """Counts log records that carry a traceback (and keeps the first few)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.exc_text:
            self.count += 1
            if len(self.examples) < 5:
                self.examples.append(f"{record.name}: {record.getMessage()[:300]}")
