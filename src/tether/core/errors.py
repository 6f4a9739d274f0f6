"""The one exception hierarchy of Tether.

Every failure a caller can act on is a `TetherError` subclass with a stable
machine-readable `reason`. `tether.grpcutil.status` maps each class to a gRPC
status code (the only place that does), and clients map statuses back.
"""

from __future__ import annotations


class TetherError(Exception):
    """Root of all Tether errors.

    Attributes:
        reason: stable UPPER_SNAKE identifier, sent as `ErrorInfo.reason`.
        metadata: small string facts for machines (never a secret).
    """

    reason = "TETHER_ERROR"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(TetherError):
    """A request field is missing, malformed or out of range."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", metadata={"field": field})
        self.field = field
        self.description = message


class NotFound(TetherError):
    """The named object does not exist."""

    reason = "NOT_FOUND"


class AlreadyExists(TetherError):
    """The object exists with different content."""

    reason = "ALREADY_EXISTS"


class InvalidTransition(TetherError):
    """The state machine refuses the event in the task's current state."""

    reason = "INVALID_TRANSITION"


class StaleFencingToken(TetherError):
    """The caller's fencing token is not the task's current one."""

    reason = "STALE_FENCING_TOKEN"


class PreconditionFailed(TetherError):
    """The system is not in a state that allows the request (e.g. a feature is off)."""

    reason = "PRECONDITION_FAILED"


class LeaseExpired(TetherError):
    """The lease lapsed (judged by the control plane's clock)."""

    reason = "LEASE_EXPIRED"


class LeaseLost(TetherError):
    """The sidecar fenced the task locally after losing its lease."""

    reason = "LEASE_LOST"


class TaskTimedOut(LeaseLost):
    """The control plane ended the task or attempt at a time limit (metadata end_reason)."""

    reason = "TASK_TIMED_OUT"


class TaskCanceled(LeaseLost):
    """An operator canceled the task; its lease ended with it."""

    reason = "TASK_CANCELED"


class PolicyDenied(TetherError):
    """The policy does not grant the tool, host, path or scope."""

    reason = "POLICY_DENIED"


class NotOwner(TetherError):
    """The task is leased to another agent or node."""

    reason = "NOT_OWNER"


class Forbidden(TetherError):
    """The caller is known but its role or identity does not allow this call."""

    reason = "FORBIDDEN"


class Unauthenticated(TetherError):
    """The caller (node, agent or operator) could not be identified."""

    reason = "UNAUTHENTICATED"


class BudgetExhausted(TetherError):
    """The task's spend limit does not cover the call."""

    reason = "BUDGET_EXHAUSTED"


class ResourceExhausted(TetherError):
    """A bounded resource (spool, payload size, rate) is full."""

    reason = "RESOURCE_EXHAUSTED"


class Overloaded(ResourceExhausted):
    """The server shed the call to protect itself (too many calls in flight, or
    the caller's rate); nothing ran, so the same call may be retried after
    `metadata["retry_after_ms"]`."""

    reason = "OVERLOADED"


class OutcomeUnknown(TetherError):
    """A non-idempotent call started earlier and its outcome is unknown."""

    reason = "OUTCOME_UNKNOWN"


class IdempotencyConflict(TetherError):
    """The idempotency key was used with different arguments."""

    reason = "IDEMPOTENCY_CONFLICT"


class ToolTimeout(TetherError):
    """A tool ran past its timeout and was killed."""

    reason = "TOOL_TIMEOUT"


class Unavailable(TetherError):
    """A dependency (usually the control plane) cannot be reached; retry later."""

    reason = "UNAVAILABLE"


class VerificationError(TetherError):
    """A signature, chain, proof or bundle fact does not hold."""

    reason = "VERIFICATION_FAILED"


class ConfigError(TetherError):
    """A configuration or policy document is invalid."""

    reason = "CONFIG_INVALID"


class StorageError(TetherError):
    """The store failed in a way the caller cannot fix."""

    reason = "STORAGE_ERROR"
