"""The one map between `TetherError` classes and gRPC statuses.

Servers turn errors into a `google.rpc.Status` with an `ErrorInfo` (domain
"tether.dev", the error's reason) and, for bad fields, a `BadRequest` naming
the field. Clients turn such statuses back into the same classes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tether.core import errors as E

DOMAIN = "tether.dev"
RETRY_AFTER_KEY = "retry_after_ms"
"""`ErrorInfo.metadata` key of a retry hint (milliseconds), where an error carries one."""
PUSHBACK_HEADER = "grpc-retry-pushback-ms"
"""The trailer gRPC clients with a retry policy obey (gRFC A6 server pushback)."""
log = logging.getLogger("tether.grpc")

STATUS_OF: dict[type[E.TetherError], grpc.StatusCode] = {
    E.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    E.IdempotencyConflict: grpc.StatusCode.INVALID_ARGUMENT,
    E.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    E.NotFound: grpc.StatusCode.NOT_FOUND,
    E.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    E.InvalidTransition: grpc.StatusCode.FAILED_PRECONDITION,
    E.StaleFencingToken: grpc.StatusCode.FAILED_PRECONDITION,
    E.LeaseExpired: grpc.StatusCode.FAILED_PRECONDITION,
    E.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    E.LeaseLost: grpc.StatusCode.FAILED_PRECONDITION,
    E.TaskTimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
    E.TaskCanceled: grpc.StatusCode.CANCELLED,
    E.PolicyDenied: grpc.StatusCode.PERMISSION_DENIED,
    E.NotOwner: grpc.StatusCode.PERMISSION_DENIED,
    E.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    E.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    E.BudgetExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E.OutcomeUnknown: grpc.StatusCode.ABORTED,
    E.ToolTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    E.Unavailable: grpc.StatusCode.UNAVAILABLE,
    E.VerificationError: grpc.StatusCode.INVALID_ARGUMENT,
    E.StorageError: grpc.StatusCode.INTERNAL,
    E.TetherError: grpc.StatusCode.INTERNAL,
}

_BY_REASON: dict[str, type[E.TetherError]] = {cls.reason: cls for cls in STATUS_OF}


def code_for(err: E.TetherError) -> grpc.StatusCode:
    """The status code of an error (by the nearest class in the map)."""
    for cls in type(err).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def to_status(err: E.TetherError) -> grpc.Status:
    """Builds the rich status for an error."""
    code = code_for(err)
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if isinstance(err, E.InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=err.field, description=err.description
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    retry_ms = _retry_after_ms(err)
    if retry_ms is not None:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=retry_ms // 1000, nanos=(retry_ms % 1000) * 1_000_000
            )
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    status = status_pb2.Status(code=code.value[0], message=err.message, details=details)
    rich = rpc_status.to_status(status)
    if retry_ms is None:
        return rich
    # The hint three ways: ErrorInfo metadata (our clients), RetryInfo (the standard
    # rich-error detail) and the pushback trailer (any gRPC client's retry policy).
    trailers = (*rich.trailing_metadata, (PUSHBACK_HEADER, str(retry_ms)))
    return _Status(rich.code, rich.details, trailers)


@dataclass(frozen=True)
class _Status(grpc.Status):
    """A `grpc.Status` with our trailers beside the rich-error one."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _retry_after_ms(err: E.TetherError) -> int | None:
    """The error's retry hint, when it carries a well-formed one."""
    raw = err.metadata.get(RETRY_AFTER_KEY)
    if raw is None or not raw.isdigit():
        return None
    return int(raw)


def from_rpc_error(err: grpc.RpcError) -> E.TetherError:
    """Turns a failed call back into the matching `TetherError`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    reason = ""
    metadata: dict[str, str] = {}
    field = ""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
    return error_of(code, message or "", reason, metadata, field)


def error_of(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    field: str = "",
) -> E.TetherError:
    """The `TetherError` a status with this code, message and ErrorInfo stands for."""
    metadata = metadata or {}
    cls = _BY_REASON.get(reason)
    if cls is E.InvalidArgument or (cls is None and code == grpc.StatusCode.INVALID_ARGUMENT):
        text = message or ""
        field = field or metadata.get("field", "")  # a refusal in a batch answer carries it here
        prefix = f"{field}: "
        desc = text[len(prefix) :] if field and text.startswith(prefix) else text
        return E.InvalidArgument(field or "request", desc)
    if cls is None:
        cls = {
            grpc.StatusCode.UNAVAILABLE: E.Unavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: E.Unavailable,
            grpc.StatusCode.NOT_FOUND: E.NotFound,
            grpc.StatusCode.PERMISSION_DENIED: E.PolicyDenied,
            grpc.StatusCode.UNAUTHENTICATED: E.Unauthenticated,
            grpc.StatusCode.RESOURCE_EXHAUSTED: E.ResourceExhausted,
            grpc.StatusCode.FAILED_PRECONDITION: E.InvalidTransition,
            grpc.StatusCode.ABORTED: E.OutcomeUnknown,
        }.get(code, E.TetherError)
    out = cls.__new__(cls)
    E.TetherError.__init__(out, message or code.name, metadata=metadata)
    return out


def _code_value(code: grpc.StatusCode) -> int:
    return int(code.value[0])


_CODES: dict[int, grpc.StatusCode] = {_code_value(c): c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a google.rpc.Code value (UNKNOWN for one not known)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


assert _code_value(grpc.StatusCode.INVALID_ARGUMENT) == code_pb2.INVALID_ARGUMENT

F = TypeVar("F", bound=Callable[..., Any])


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: E.TetherError) -> None:
    """Aborts the RPC with the error's rich status."""
    await context.abort_with_status(to_status(err))


def handle_errors(fn: F) -> F:
    """Wraps a servicer method so `TetherError` becomes its gRPC status.

    Unexpected exceptions become INTERNAL with a generic message (the details go
    to the log, not to the client, so nothing sensitive leaks).
    """
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except E.TetherError as err:
                await abort(context, err)
            except Exception:
                log.exception("unexpected error in %s", fn.__name__)
                await abort(context, E.TetherError("internal error; see the server log"))

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except E.TetherError as err:
            await abort(context, err)
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            await abort(context, E.TetherError("internal error; see the server log"))

    return wrapper  # type: ignore[return-value]


AsyncFn = Callable[..., Awaitable[Any]]
