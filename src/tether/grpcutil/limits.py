"""Load shedding for both gRPC servers: bounded calls, streams, connections and rates.

Without limits a flood is queued, not refused: every call waits for the event
loop, every idle stream holds memory, and health checks queue behind the
flood until probes time out. Two layers bound that:

- gRPC core, from `ServerLimits.grpc_options()`: streams per HTTP/2 connection
  (`grpc.max_concurrent_streams`, which clients honour by queueing on their
  side), a connection cap, a bounded backlog of calls not yet taken by the
  event loop (past it core answers CANCELLED), keepalive pings (dead peers are found) and their
  enforcement (a client pinging more often than `min_ping_interval_ms` gets a
  GOAWAY after `max_ping_strikes`), and idle and maximum connection age (a
  connection is closed after its age, with a grace for the calls on it).
- `LoadShedder`, a server interceptor shared by every server of the process
  role: a call is admitted only while the server has fewer than
  `max_concurrent_rpcs` calls in flight, its caller (an agent at a sidecar; a
  node or operator at the control plane, named by the same identity the call
  is authorized with) fewer than `max_rpcs_per_caller`, and the caller's token
  bucket (`caller_rate_per_s`, `caller_burst`) a token. Otherwise the call is
  shed before any work: RESOURCE_EXHAUSTED with an `ErrorInfo` of reason
  OVERLOADED and a retry hint (`retry_after_ms` in its metadata, a
  `google.rpc.RetryInfo`, and the `grpc-retry-pushback-ms` trailer), counted in
  `tether_shed_total{server,reason}`.

A call is counted from the moment its headers arrive: the interceptor turns
every handler into a streaming one, so the servicer's code runs at once and
the shedder reads a unary request itself, giving up on a request that has not
arrived within `request_read_timeout_ms` (an idle, header-only call is shed
with reason "idle" instead of holding its slot). Health checks
(`grpc.health.v1.Health/Check` and `/List`) are never shed or counted, so
probes keep answering during a flood.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

import grpc

from tether.core.errors import ConfigError, InvalidArgument, Overloaded, TetherError
from tether.grpcutil.guard import _respond
from tether.grpcutil.status import RETRY_AFTER_KEY, abort, to_status
from tether.metrics import RPCS_IN_FLIGHT, SHED

log = logging.getLogger("tether.grpc.limits")

MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
"""The largest ControlService message either side sends or accepts (the control plane's
server options and every client's channel options)."""

EXEMPT_METHODS: Final = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"})
"""Never shed, never counted: a probe must answer while the server sheds everything else."""
METERED_STREAMS: Final = frozenset({"/tether.v1.ControlService/StreamLeases"})
"""Streams whose every request is a call's worth of work (a step that ends and grants
tasks): each request after the first takes a token from the caller's rate bucket, and
waits for one when the bucket is empty, so a stream is not a way around
`caller_rate_per_s`."""
UNAUTHENTICATED_CALLER: Final = "(unauthenticated)"
"""The one caller key of every call whose caller cannot be identified."""
MAX_BUCKETS: Final = 4096
"""Above this many rate buckets, the full ones (indistinguishable from new) are dropped."""
_LOG_EVERY_S: Final = 10.0


@dataclass(frozen=True)
class ServerLimits:
    """How much one server accepts at once; 0 turns off a limit marked "0: off"."""

    max_concurrent_rpcs: int = 1024
    """Calls in flight on the server (all callers, all listeners); past it new calls are
    shed (reason concurrency)."""
    max_rpcs_per_caller: int = 128
    """Calls in flight of one caller (an agent, a node, an operator); past it that caller's
    new calls are shed (reason caller_concurrency). Also bounds one caller's streams."""
    caller_rate_per_s: int = 2000
    """Calls per second one caller may start, sustained (a token bucket); 0: off."""
    caller_burst: int = 4000
    """Calls one caller may start at once before `caller_rate_per_s` applies."""
    request_read_timeout_ms: int = 10_000
    """How long a unary call may take to deliver its request after its headers; then (at
    a random point up to 25 % later) it is shed (reason idle). Streaming requests are not
    timed (a stream may be quiet)."""
    max_streams_per_connection: int = 256
    """HTTP/2 streams (calls) open at once on one connection (grpc.max_concurrent_streams);
    clients queue further calls on their side."""
    max_connections: int = 1024
    """Connections the server holds at once (grpc.max_allowed_incoming_connections);
    0: unlimited."""
    max_pending_calls: int = 1000
    """Calls gRPC core holds before the server has looked at them (its backlog when calls
    arrive faster than the event loop takes them): past it core refuses a growing share of
    new calls, and all past three times it, with CANCELLED (no retry hint)."""
    keepalive_time_ms: int = 60_000
    """The server pings a connection quiet this long, to find dead peers."""
    keepalive_timeout_ms: int = 20_000
    """A ping unanswered this long closes the connection."""
    min_ping_interval_ms: int = 10_000
    """Clients may ping at most this often (grpc.http2.min_ping_interval_without_data_ms);
    faster pings are strikes."""
    max_ping_strikes: int = 2
    """Strikes before a client that pings too often is sent GOAWAY (too_many_pings)."""
    max_connection_idle_ms: int = 300_000
    """A connection with no call this long is closed (clients reconnect on their next
    call); 0: off."""
    max_connection_age_ms: int = 1_800_000
    """A connection is sent GOAWAY after this age (clients reconnect; a flood's
    connections do not live forever); 0: off."""
    max_connection_age_grace_ms: int = 120_000
    """Calls still running on an aged connection get this long to finish (longer than a
    60 s claim wait); then they are cancelled."""
    retry_after_ms: int = 200
    """The retry hint of a call shed for concurrency (a random value between it and twice
    it); a rate refusal's hint is when the caller's next token is due."""

    def __post_init__(self) -> None:
        for f in fields(self):
            low, high = LIMIT_RANGES[f.name]
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{f.name}: expected an integer, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{f.name}: {value} is outside {low}..{high}")
        if self.caller_rate_per_s and self.caller_burst < 1:
            raise ConfigError("caller_burst: must be at least 1 when caller_rate_per_s is on")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC core server options these limits set."""
        options = [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            # Count open streams, not streams whose memory is not yet freed: with the
            # latter (core's default) a burst within the limit is refused REFUSED_STREAM
            # (UNAVAILABLE, no retry hint) before Tether can answer it.
            ("grpc.http.overload_protection", 0),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            # Idle connections are pinged too (dead peers found), and clients may
            # keep theirs alive no faster than min_ping_interval_ms.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]
        options += [
            ("grpc.server.max_pending_requests", self.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", 3 * self.max_pending_calls),
        ]
        if self.max_connections:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        if self.max_connection_idle_ms:
            options.append(("grpc.max_connection_idle_ms", self.max_connection_idle_ms))
        if self.max_connection_age_ms:
            options += [
                ("grpc.max_connection_age_ms", self.max_connection_age_ms),
                ("grpc.max_connection_age_grace_ms", self.max_connection_age_grace_ms),
            ]
        return options

    def replace(self, values: Mapping[str, Any]) -> ServerLimits:
        """These limits with `values` (by field name; None: keep) set, validated.

        Raises:
            ConfigError: an unknown name, or a value that is not an integer in range.
        """
        changed: dict[str, int] = {}
        for name, value in values.items():
            if name not in LIMIT_RANGES:
                raise ConfigError(f"{name}: not a server limit")
            if value is None:
                continue
            if isinstance(value, bool):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            try:
                changed[name] = int(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from err
        return ServerLimits(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changed})


LIMIT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "max_concurrent_rpcs": (1, 1_000_000),
    "max_rpcs_per_caller": (1, 1_000_000),
    "caller_rate_per_s": (0, 10_000_000),
    "caller_burst": (0, 10_000_000),
    "request_read_timeout_ms": (100, 600_000),
    "max_streams_per_connection": (1, 100_000),
    "max_connections": (0, 1_000_000),
    "max_pending_calls": (1, 1_000_000),
    "keepalive_time_ms": (1_000, 7_200_000),
    "keepalive_timeout_ms": (1_000, 600_000),
    "min_ping_interval_ms": (1_000, 7_200_000),
    "max_ping_strikes": (0, 1_000),
    "max_connection_idle_ms": (0, 86_400_000),
    "max_connection_age_ms": (0, 86_400_000),
    "max_connection_age_grace_ms": (0, 86_400_000),
    "retry_after_ms": (1, 600_000),
}
"""Each limit's allowed range (checked when `ServerLimits` is built)."""

SIDECAR_LIMITS: Final = ServerLimits()
"""The sidecar's defaults: callers are agents (a few per node, each mostly serial)."""
CONTROL_LIMITS: Final = ServerLimits(
    max_concurrent_rpcs=4096,
    max_rpcs_per_caller=1024,
    caller_rate_per_s=10_000,
    caller_burst=20_000,
    max_connections=8192,
)
"""The control plane's defaults: callers are nodes (a sidecar calls for all its agents,
claim waits included) and operators."""


@dataclass
class _Bucket:
    tokens: float
    at: float


class LoadShedder:
    """The admission state of one server role (every listener of a sidecar shares one).

    `interceptor(caller_of)` makes the interceptor for one listener; `caller_of`
    names the caller of a call from its `ServicerContext` (it may raise; an
    unidentified caller shares the key UNAUTHENTICATED_CALLER).
    """

    def __init__(
        self,
        limits: ServerLimits,
        server: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.server = server
        self._clock = clock
        self.in_flight = 0
        self._per_caller: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at = -_LOG_EVERY_S
        self._gauge = RPCS_IN_FLIGHT.labels(server=server)

    def interceptor(self, caller_of: Callable[[Any], str]) -> grpc.aio.ServerInterceptor:
        """The interceptor of one listener whose callers `caller_of` names."""
        return _ShedInterceptor(self, caller_of)

    def admit(self, caller: str) -> Overloaded | None:
        """Takes a slot (and a token) for one call of `caller`, or says why not.

        A None answer must be paired with one `release(caller)`.
        """
        limits = self.limits
        if self.in_flight >= limits.max_concurrent_rpcs:
            return self._shed(
                "concurrency",
                caller,
                f"the server is at its limit of calls in flight "
                f"(max_concurrent_rpcs = {limits.max_concurrent_rpcs})",
                self._jittered(),
            )
        mine = self._per_caller.get(caller, 0)
        if mine >= limits.max_rpcs_per_caller:
            return self._shed(
                "caller_concurrency",
                caller,
                f"caller {caller!r} is at its limit of calls in flight "
                f"(max_rpcs_per_caller = {limits.max_rpcs_per_caller})",
                self._jittered(),
            )
        wait_ms = self.take_token(caller)
        if wait_ms:
            return self._shed(
                "rate",
                caller,
                f"caller {caller!r} is over its rate (caller_rate_per_s = "
                f"{limits.caller_rate_per_s}, caller_burst = {limits.caller_burst})",
                wait_ms,
            )
        self.in_flight += 1
        self._per_caller[caller] = mine + 1
        self._gauge.inc()
        return None

    def release(self, caller: str) -> None:
        """Frees the slot an admitted call of `caller` held."""
        self.in_flight -= 1
        self._gauge.dec()
        left = self._per_caller.get(caller, 1) - 1
        if left > 0:
            self._per_caller[caller] = left
        else:
            self._per_caller.pop(caller, None)

    def shed_idle(self, caller: str) -> Overloaded:
        """The refusal of a unary call whose request did not arrive in time."""
        return self._shed(
            "idle",
            caller,
            f"no request within request_read_timeout_ms = {self.limits.request_read_timeout_ms}"
            " after the call's headers; the server holds no idle calls",
            self._jittered(),
        )

    def _jittered(self) -> int:
        base = self.limits.retry_after_ms
        return base + random.randrange(base + 1)

    def take_token(self, caller: str) -> int:
        """0 when `caller` had a token (now spent); else milliseconds until it has one."""
        rate = self.limits.caller_rate_per_s
        if not rate:
            return 0
        burst = float(self.limits.caller_burst)
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[caller] = _Bucket(burst, now)
        else:
            bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.at) * rate)
            bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0
        return max(1, int((1 - bucket.tokens) * 1000 / rate + 0.999))

    def _prune(self, now: float) -> None:
        rate, burst = self.limits.caller_rate_per_s, self.limits.caller_burst
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) * rate >= burst:
                del self._buckets[key]

    def _shed(self, reason: str, caller: str, why: str, retry_ms: int) -> Overloaded:
        SHED.labels(server=self.server, reason=reason).inc()
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = self._clock()
        if now - self._logged_at >= _LOG_EVERY_S:  # a flood must not flood the log too
            self._logged_at = now
            counts = ", ".join(f"{n} {r}" for r, n in sorted(self._unlogged.items()))
            self._unlogged.clear()
            log.warning(
                "%s shedding load: %s (shed since last report: %s)", self.server, why, counts
            )
        return Overloaded(
            f"overloaded, retry later: {why}",
            metadata={"reason": reason, RETRY_AFTER_KEY: str(retry_ms)},
        )


@functools.lru_cache(maxsize=4096)
def _shed_status(message: str, reason: str, retry_ms: str) -> grpc.Status:
    """The rich status of a refusal, built once per distinct refusal: a flood gets the
    same few answers thousands of times, and building one costs more than the shedding."""
    return to_status(Overloaded(message, metadata={"reason": reason, RETRY_AFTER_KEY: retry_ms}))


async def _shed_call(context: Any, refusal: Overloaded) -> None:
    """Ends the call with the refusal's status (raises, like `abort`)."""
    meta = refusal.metadata
    await context.abort_with_status(
        _shed_status(refusal.message, meta["reason"], meta[RETRY_AFTER_KEY])
    )


Handler = Any  # grpc.RpcMethodHandler (its stubs are not generic at runtime)


class _ShedInterceptor(grpc.aio.ServerInterceptor):
    """Admits or sheds each call of one listener (see the module docstring)."""

    def __init__(self, shedder: LoadShedder, caller_of: Callable[[Any], str]) -> None:
        self._shedder = shedder
        self._caller_of = caller_of

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in EXEMPT_METHODS:
            return handler
        return self._wrap(handler, metered=handler_call_details.method in METERED_STREAMS)

    def _caller(self, context: Any) -> str:
        try:
            return self._caller_of(context)
        except TetherError:
            return UNAUTHENTICATED_CALLER

    async def _admit(self, context: Any) -> str:
        caller = self._caller(context)
        refusal = self._shedder.admit(caller)
        if refusal is not None:
            await _shed_call(context, refusal)  # raises: the call ends here
        return caller

    async def _request(self, requests: AsyncIterator[Any], context: Any, caller: str) -> Any:
        """The one request of a unary call, read within request_read_timeout_ms.

        The timeout is stretched by a random 0-25 %, so that a flood's idle calls, which
        arrived together, are not all shed in the same instant (a stall for everyone).
        """
        timeout_s = self._shedder.limits.request_read_timeout_ms * random.uniform(1, 1.25) / 1000
        try:
            async with asyncio.timeout(timeout_s):  # no task per call, unlike wait_for
                return await anext(aiter(requests))
        except TimeoutError:
            await _shed_call(context, self._shedder.shed_idle(caller))
        except StopAsyncIteration:
            await abort(context, InvalidArgument("request", "the call ended without a request"))
        raise AssertionError("unreachable: abort raises")

    async def _paced(self, requests: AsyncIterator[Any], caller: str) -> AsyncIterator[Any]:
        """A metered stream's requests, each after the first held until the caller's rate
        bucket gives it a token (the call's admission took the first one)."""
        first = True
        async for request in requests:
            if not first:
                # A token is a matter of time, not of an event: sleep until it is due.
                while wait_ms := self._shedder.take_token(caller):  # noqa: ASYNC110
                    await asyncio.sleep(wait_ms / 1000)
            first = False
            yield request

    def _wrap(self, handler: Handler, *, metered: bool = False) -> Handler:
        shedder = self._shedder
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(requests: Any, context: Any) -> Any:
                caller = await self._admit(context)
                try:
                    request = await self._request(requests, context, caller)
                    return await inner_uu(request, context)
                finally:
                    shedder.release(caller)

            return grpc.stream_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                caller = await self._admit(context)
                try:
                    request = await self._request(requests, context, caller)
                    async for item in _respond(inner_us(request, context)):
                        yield item
                finally:
                    shedder.release(caller)

            return grpc.stream_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                caller = await self._admit(context)
                try:
                    return await inner_su(requests, context)
                finally:
                    shedder.release(caller)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                caller = await self._admit(context)
                if metered:
                    requests = self._paced(requests, caller)
                try:
                    async for item in _respond(inner_ss(requests, context)):
                        yield item
                finally:
                    shedder.release(caller)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=deserializer, response_serializer=serializer
            )
        return handler


_FLAG_HELP: Final[dict[str, str]] = {
    "max_concurrent_rpcs": "calls in flight on the server; past it calls are shed",
    "max_rpcs_per_caller": "calls (streams) in flight of one {caller}; past it its calls are shed",
    "caller_rate_per_s": "calls per second one {caller} may start, sustained (0: off)",
    "caller_burst": "calls one {caller} may start at once before the rate applies",
    "request_read_timeout_ms": "a unary call's request must follow its headers within this",
    "max_streams_per_connection": "HTTP/2 streams open at once on one connection",
    "max_connections": "connections held at once (0: unlimited)",
    "max_pending_calls": "calls gRPC core queues before the server takes them",
    "keepalive_time_ms": "ping a connection quiet this long",
    "keepalive_timeout_ms": "close a connection whose ping is unanswered this long",
    "min_ping_interval_ms": "clients pinging more often than this get strikes",
    "max_ping_strikes": "strikes before a GOAWAY (too many pings)",
    "max_connection_idle_ms": "close a connection with no call this long (0: off)",
    "max_connection_age_ms": "send GOAWAY to a connection this old (0: off)",
    "max_connection_age_grace_ms": "calls on an aged connection may run this much longer",
    "retry_after_ms": "retry hint of a call shed for concurrency",
}


def add_limit_arguments(
    parser: argparse.ArgumentParser, defaults: ServerLimits, caller: str
) -> None:
    """Adds --max-concurrent-rpcs, ... (one flag per limit) in a "load shedding" group.

    Every flag defaults to None (absent), so lower-precedence sources still apply.
    """
    group = parser.add_argument_group(
        "load shedding", "limits of the gRPC server (see docs/operations.md, Load shedding)"
    )
    for name, text in _FLAG_HELP.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=int,
            metavar="N",
            help=f"{text.format(caller=caller)} (default {getattr(defaults, name)})",
        )


def limit_values(args: argparse.Namespace) -> dict[str, int | None]:
    """The limits given on the command line (None where absent)."""
    return {name: getattr(args, name, None) for name in LIMIT_RANGES}
