"""One leader per singleton job among control-plane replicas, elected through the store.

Jobs that must run once per deployment, not once per replica (the lapsed-lease
sweeper, the scheduled checkpoint signer), run only on the replica holding the
job's row in the `leaders` table. A term lasts `ttl_ms` on the database's clock
and the holder renews it every third of that; a replica that dies, pauses or
loses the database stops renewing and another takes the job once the term
lapsed, so a handover takes at most `ttl_ms` plus one renewal period.

A replica trusts its own leadership only until (its monotonic time when it
SENT the renewal) + ttl - margin, always before the database's expiry, the same
rule a sidecar applies to its leases. A leader that was paused therefore knows
on waking that its term is over before it acts, whatever it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time

from tether.core.errors import TetherError
from tether.store.base import Store

log = logging.getLogger("tether.control.leader")

DEFAULT_LEADER_TTL_MS = 5_000

SWEEPER = "sweeper"
CHECKPOINTER = "checkpointer"


def default_replica_id() -> str:
    """host:pid:random, unique per process (a restarted replica is a new candidate)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Leadership:
    """Campaigns for `job` in the background; `is_leader()` says whether to act now."""

    def __init__(
        self, store: Store, job: str, holder: str, ttl_ms: int = DEFAULT_LEADER_TTL_MS
    ) -> None:
        if ttl_ms < 300:
            raise ValueError("leader TTL must be at least 300 ms")
        self.store = store
        self.job = job
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.epoch = 0
        self._valid_until = 0.0  # monotonic seconds
        self._margin_s = max(0.1, ttl_ms / 10_000)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def is_leader(self) -> bool:
        """True while this replica's term surely has not lapsed on the database."""
        return time.monotonic() < self._valid_until

    def start(self) -> None:
        """Starts campaigning (and renewing) in the background."""
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._loop(), name=f"tether-leader-{self.job}")

    async def stop(self) -> None:
        """Stops campaigning; a leader resigns, so another replica takes over at once."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self._valid_until:
            self._valid_until = 0.0
            with contextlib.suppress(TetherError):
                await self.store.resign(self.job, self.holder)

    async def campaign_once(self) -> bool:
        """One try to take or renew the term; True if this replica leads now."""
        sent = time.monotonic()
        try:
            epoch = await self.store.try_lead(
                self.job, self.holder, self.ttl_ms, time.time_ns() // 1_000_000
            )
        except TetherError as err:  # the database is away: the term runs out on its own
            log.warning("leader election for %s failed: %s", self.job, err.message)
            return self.is_leader()
        if epoch is None:
            if self._valid_until:
                log.warning("no longer the %s leader", self.job, extra={"epoch": self.epoch})
            self._valid_until = 0.0
            return False
        if epoch != self.epoch or not self._valid_until:
            log.info("leading %s", self.job, extra={"epoch": epoch, "replica": self.holder})
        self.epoch = epoch
        self._valid_until = sent + self.ttl_ms / 1000 - self._margin_s
        return True

    async def _loop(self) -> None:
        period = self.ttl_ms / 3000
        while not self._stop.is_set():
            await self.campaign_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
