"""Background sweeper: ends lapsed leases (LAPSE event) on the injected clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tether.control.leader import Leadership
from tether.control.service import ControlService
from tether.core.errors import TetherError

DEFAULT_SWEEP_INTERVAL_MS = 1_000

log = logging.getLogger("tether.control.sweeper")


class Sweeper:
    """Calls `ControlService.sweep` every `interval_ms` until stopped.

    A lapsed lease sends its task back to queued (attempt kept, so the next
    lease is attempt+1) with not_before = now + min(base * 2**(attempt-1), cap),
    or to expired once `max_attempts` is spent. Renewals and transitions
    already refuse a lapsed lease before the sweeper runs; the sweeper only
    makes the task leasable again.

    With `leader`, only the replica leading the "sweeper" job sweeps (the
    others wait, ready to take over); without, this process sweeps alone.
    """

    def __init__(
        self,
        service: ControlService,
        interval_ms: int = DEFAULT_SWEEP_INTERVAL_MS,
        leader: Leadership | None = None,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError("sweep interval must be positive")
        self.service = service
        self.interval_ms = interval_ms
        self.leader = leader
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts sweeping in the background."""
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._loop(), name="tether-sweeper")

    async def stop(self) -> None:
        """Stops and waits for the current sweep to finish."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.leader is None or self.leader.is_leader():
                    await self.service.sweep()
            except TetherError as err:  # keep sweeping; the store may recover
                log.error("sweep failed: %s", err.message)
            except Exception:
                log.exception("sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_ms / 1000)
