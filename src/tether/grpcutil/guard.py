"""Requests that do not decode get INVALID_ARGUMENT, not UNKNOWN and a traceback.

gRPC deserializes a request before any servicer code (and so before the error
map in `tether.grpcutil.status`) runs: a payload that is not the RPC's message
(truncated, a wrong wire type, invalid UTF-8 in a string field) made grpcio
answer UNKNOWN on unary RPCs and INTERNAL on streams, and log a full traceback
for each, so garbage flooded the logs. `guard_handler` replaces a method
handler's request deserializer with one that returns `UNDECODABLE` instead of
raising, and wraps its behavior so that a request (or, on a stream, any
message) that is `UNDECODABLE` ends the call with INVALID_ARGUMENT on field
"request" and one debug log line. `DecodeGuard` applies it to every method of
a server; `tether.control.authz.AuthzInterceptor` applies it to the handlers
it wraps, so authorization still runs first.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeAlias

import grpc

from tether.core.errors import InvalidArgument, TetherError
from tether.grpcutil.status import abort

log = logging.getLogger("tether.grpc")


class _Undecodable:
    """The type of `UNDECODABLE`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE: Final = _Undecodable()
"""What a guarded deserializer returns for bytes that are not the RPC's message."""

_GUARDED = "_tether_decode_guarded"


def undecodable() -> InvalidArgument:
    """The error an undecodable request gets (field "request")."""
    return InvalidArgument(
        "request", "is not a valid protobuf encoding of this RPC's request message"
    )


def _guard_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # raw bytes in, raw bytes out: nothing to decode
        return None

    def guarded(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as err:  # DecodeError, and anything else a bad payload raises
            log.debug("undecodable request (%d bytes): %s", len(data), type(err).__name__)
            return UNDECODABLE

    return guarded


async def _messages(request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream's messages; an undecodable one raises InvalidArgument (the servicer's
    error handling, or the wrapper around it, turns that into INVALID_ARGUMENT)."""
    async for message in request_iterator:
        if message is UNDECODABLE:
            raise undecodable()
        yield message


async def _respond(result: Any) -> AsyncIterator[Any]:
    """The responses of a streaming behavior (an async iterator, or a coroutine that
    writes with `context.write`)."""
    if inspect.isawaitable(result):
        await result
        return
    async for item in result:
        yield item


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def guard_handler(handler: Handler) -> Handler:
    """`handler` with undecodable requests answered INVALID_ARGUMENT (idempotent)."""
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if behavior is None or getattr(behavior, _GUARDED, False):
        return handler
    deserializer = _guard_deserializer(handler.request_deserializer)
    serializer = handler.response_serializer
    made: Handler
    if handler.unary_unary is not None:
        inner_uu: Callable[..., Awaitable[Any]] = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            if request is UNDECODABLE:
                await abort(context, undecodable())
            return await inner_uu(request, context)

        made = grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=deserializer, response_serializer=serializer
        )
    elif handler.unary_stream is not None:
        inner_us: Callable[..., Any] = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if request is UNDECODABLE:
                await abort(context, undecodable())
            async for item in _respond(inner_us(request, context)):
                yield item

        made = grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    elif handler.stream_unary is not None:
        inner_su: Callable[..., Awaitable[Any]] = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            try:
                return await inner_su(_messages(request_iterator), context)
            except TetherError as err:  # raised past a servicer without error mapping
                await abort(context, err)

        made = grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=deserializer, response_serializer=serializer
        )
    elif handler.stream_stream is not None:
        inner_ss: Callable[..., Any] = handler.stream_stream

        async def stream_stream(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in _respond(inner_ss(_messages(request_iterator), context)):
                    yield item
            except TetherError as err:
                await abort(context, err)

        made = grpc.stream_stream_rpc_method_handler(
            stream_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    else:
        return handler
    for fn in (made.unary_unary, made.unary_stream, made.stream_unary, made.stream_stream):
        if fn is not None:
            setattr(fn, _GUARDED, True)
    return made


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Applies `guard_handler` to every method the server serves."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return guard_handler(handler)
