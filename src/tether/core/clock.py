"""Injectable clocks, so leases, sweeps and budgets are tested without sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of wall time in Unix milliseconds, and of monotonic time."""

    def now_ms(self) -> int:
        """Returns the current time in Unix milliseconds."""
        ...

    def monotonic_ms(self) -> int:
        """Milliseconds on a clock that never jumps (only differences mean anything).

        Deadlines a process keeps for itself (a sidecar's lease validity) use this,
        so a wall-clock step or skew changes nothing.
        """
        ...


class SystemClock:
    """The real wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


class FakeClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def monotonic_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        """Moves time forward by `ms` milliseconds."""
        if ms < 0:
            raise ValueError("time only moves forward")
        self._now += ms
