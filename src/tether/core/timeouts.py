"""Timeouts, end reasons and the retry policy of a task (Temporal's activity model).

A task has four limits, all judged by the control plane's one clock (the
sweeper's; the database's with PostgreSQL):

- heartbeat timeout: the lease TTL; a lease not renewed in time lapses.
- attempt timeout (start-to-close): how long one attempt may hold its lease,
  however often it renews.
- deadline (schedule-to-close): how long the task may take from submission,
  whatever its state; past it the task ends `expired` with reason `deadline`.
- schedule-to-start timeout: how long the task may wait in the queue, ready, for
  a lease; past it the task ends `expired`.

A lapsed or timed-out attempt is retried after a backoff while attempts
remain; a failure is retried only when the retry policy says so and the
failure is not marked non-retryable. Pure: no I/O, no gRPC.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from tether.core.states import State

DEFAULT_INITIAL_INTERVAL_MS = 1_000
DEFAULT_BACKOFF_COEFFICIENT = 2.0
DEFAULT_MAXIMUM_INTERVAL_MS = 60_000
MAX_LIMIT_MS = 30 * 24 * 3600 * 1000
"""Longest attempt timeout, deadline or schedule-to-start timeout (30 days)."""
MIN_LIMIT_MS = 1_000
"""Shortest limit: below a second the sweeper's own interval dominates."""
MAX_INTERVAL_MS = 24 * 3600 * 1000
"""Longest retry interval (a day)."""
MAX_COEFFICIENT = 100.0
MAX_NON_RETRYABLE = 32
"""At most this many non-retryable failure types per task."""


class EndReason(enum.IntEnum):
    """Why a task, or its latest attempt, ended; values match `tether.v1.EndReason`."""

    SUCCEEDED = 1
    FAILED = 2
    NON_RETRYABLE = 3
    HEARTBEAT_TIMEOUT = 4
    ATTEMPT_TIMEOUT = 5
    SCHEDULE_TO_START_TIMEOUT = 6
    DEADLINE = 7
    CANCELED = 8
    RELEASED = 9

    @property
    def label(self) -> str:
        """The lower-case name shown to users and written in receipts, e.g. "deadline"."""
        return self.name.lower()


# The reasons the control plane decides on its own clock (or an operator's cancel),
# as opposed to the lease holder's own SUCCEED/FAIL/RELEASE: a holder learns them at
# its next renewal, and each gets a control-signed receipt.
ENFORCED = frozenset(
    {
        EndReason.HEARTBEAT_TIMEOUT,
        EndReason.ATTEMPT_TIMEOUT,
        EndReason.SCHEDULE_TO_START_TIMEOUT,
        EndReason.DEADLINE,
        EndReason.CANCELED,
    }
)

# The limit each enforced reason names (as in receipts and docs).
LIMIT_OF = {
    EndReason.HEARTBEAT_TIMEOUT: "heartbeat_timeout",
    EndReason.ATTEMPT_TIMEOUT: "attempt_timeout",
    EndReason.SCHEDULE_TO_START_TIMEOUT: "schedule_to_start_timeout",
    EndReason.DEADLINE: "deadline",
}

# Where each reason leaves the task when it ends it for good (docs/policy.md).
FINAL_STATE = {
    EndReason.SUCCEEDED: State.SUCCEEDED,
    EndReason.FAILED: State.FAILED,
    EndReason.NON_RETRYABLE: State.FAILED,
    EndReason.HEARTBEAT_TIMEOUT: State.EXPIRED,
    EndReason.ATTEMPT_TIMEOUT: State.EXPIRED,
    EndReason.SCHEDULE_TO_START_TIMEOUT: State.EXPIRED,
    EndReason.DEADLINE: State.EXPIRED,
    EndReason.CANCELED: State.CANCELED,
    EndReason.RELEASED: State.EXPIRED,
}


def end_reason_label(value: int) -> str:
    """The label of an end reason value ("" for none or an unknown value)."""
    try:
        return EndReason(value).label
    except ValueError:
        return ""


def end_reason_from_label(label: str) -> EndReason | None:
    """The reason a label names, or None."""
    try:
        return EndReason[label.upper()]
    except KeyError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a task is tried again.

    Delay before attempt n+1 = min(initial * coefficient^(n-1), maximum).
    """

    initial_interval_ms: int = DEFAULT_INITIAL_INTERVAL_MS
    """Delay after the first attempt ends."""
    backoff_coefficient: float = DEFAULT_BACKOFF_COEFFICIENT
    """Each further delay is the previous one times this (>= 1)."""
    maximum_interval_ms: int = DEFAULT_MAXIMUM_INTERVAL_MS
    """No delay is longer."""
    maximum_attempts: int = 3
    """Attempts in all (the task's max_attempts)."""
    non_retryable_reasons: tuple[str, ...] = ()
    """Failure types never retried (as given with FAIL)."""
    retry_failures: bool = False
    """Whether a holder's FAIL is retried (lapses and attempt timeouts always are)."""

    def __post_init__(self) -> None:
        if self.initial_interval_ms < 1:
            raise ValueError("initial_interval_ms must be positive")
        if not (math.isfinite(self.backoff_coefficient) and self.backoff_coefficient >= 1.0):
            raise ValueError("backoff_coefficient must be a finite number >= 1")
        if self.maximum_interval_ms < self.initial_interval_ms:
            raise ValueError("maximum_interval_ms must be at least initial_interval_ms")
        if self.maximum_attempts < 1:
            raise ValueError("maximum_attempts must be at least 1")

    def delay_ms(self, attempt: int) -> int:
        """Delay before the attempt after `attempt` (1-based) may start."""
        n = max(attempt - 1, 0)
        # Computed in floating point with a cap first, so a huge exponent never overflows.
        if self.backoff_coefficient > 1.0 and n > 0:
            steps = math.log(self.maximum_interval_ms / self.initial_interval_ms) / math.log(
                self.backoff_coefficient
            )
            if n >= steps:
                return self.maximum_interval_ms
        delay = self.initial_interval_ms * self.backoff_coefficient**n
        return int(min(delay, self.maximum_interval_ms))

    def schedule_ms(self) -> list[int]:
        """The delays between attempts 1..maximum_attempts (one fewer than attempts)."""
        return [self.delay_ms(n) for n in range(1, self.maximum_attempts)]

    def retries_failure(self, failure_type: str, non_retryable: bool) -> bool:
        """Whether a FAIL of this type would be retried (attempts permitting)."""
        return (
            self.retry_failures
            and not non_retryable
            and failure_type not in self.non_retryable_reasons
        )


@dataclass(frozen=True)
class Limits:
    """A task's time limits in milliseconds; 0 means none (the heartbeat timeout is required)."""

    heartbeat_timeout_ms: int
    """The lease TTL: renewals must come at least this often."""
    attempt_timeout_ms: int = 0
    """Start-to-close: one attempt's lease ends this long after its grant."""
    deadline_ms: int = 0
    """Schedule-to-close: the task ends this long after submission."""
    schedule_to_start_timeout_ms: int = 0
    """How long the task may wait ready in the queue for a lease."""


def encode_reasons(reasons: tuple[str, ...]) -> str:
    """Non-retryable types as one store column (newline separated; types have no newline)."""
    return "\n".join(reasons)


def decode_reasons(text: str) -> tuple[str, ...]:
    """The inverse of `encode_reasons`."""
    return tuple(r for r in text.split("\n") if r)
