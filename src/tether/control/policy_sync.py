"""The policy in force, as one replica knows it, never staler than a documented bound.

The store is the one source of truth: `PutPolicy` through any replica stores a
new version, and every replica signs leases under the newest stored version.
With a store shared by replicas (PostgreSQL) a replica learns of a new version

* at once, from the NOTIFY that the storing transaction sends at commit
  (LISTEN on a dedicated connection, re-established when it drops), and
* in any case within `max_staleness_ms`: a background re-check reads the
  newest version every half of that, and a lease or task is never granted
  under a view older than `max_staleness_ms` (measured from when the read
  that confirmed it was sent); a staler view is re-read first.

So a lease signed at time t carries a policy that was in force at some instant
of [t - max_staleness_ms, t]. A single-process store (SQLite) has no other
writer: its view is exact and never re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tether.core.errors import TetherError
from tether.core.policy import Policy, parse_policy
from tether.store.base import POLICY_CHANNEL, Notifier, PolicyRecord, Store

log = logging.getLogger("tether.control.policy")

DEFAULT_POLICY_MAX_STALENESS_MS = 1_000


class PolicyInForce:
    """This replica's view of the newest stored policy and how fresh it is."""

    def __init__(self, store: Store, max_staleness_ms: int = DEFAULT_POLICY_MAX_STALENESS_MS):
        if max_staleness_ms < 50:
            raise ValueError("policy staleness bound must be at least 50 ms")
        self.store = store
        self.max_staleness_ms = max_staleness_ms
        self.shared = isinstance(store, Notifier)
        self.policy: Policy | None = None
        self.version = 0
        self._confirmed = float("-inf")  # monotonic s when the confirming read was sent
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.listening = False
        """True while the LISTEN connection is up (for tests and diagnostics)."""

    def adopt(self, rec: PolicyRecord, policy: Policy | None = None) -> None:
        """Puts stored version `rec` in force here unless a newer one already is."""
        if rec.version <= self.version:
            return
        self.policy = policy or parse_policy(rec.document)
        old, self.version = self.version, rec.version
        if old:
            log.info("policy version %d in force (digest %s)", rec.version, rec.digest[:12])

    async def refresh(self) -> None:
        """Reads the newest stored version and adopts it (one query; parses only on change).

        Raises:
            StorageError, Unavailable: the store could not be read.
        """
        async with self._refresh_lock:
            sent = time.monotonic()
            rec = await self.store.get_policy(0)
            if rec is not None:
                self.adopt(rec)
            self._confirmed = max(self._confirmed, sent)

    async def current(self) -> Policy | None:
        """The policy to grant under now: re-read first if the view may be too old."""
        if self.shared and (time.monotonic() - self._confirmed) * 1000 > self.max_staleness_ms:
            await self.refresh()
        return self.policy

    def start(self) -> None:
        """Follows changes in the background (shared stores only)."""
        if self.shared and self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._follow(), name="tether-policy-follow")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        """Runs the LISTEN loop and the periodic re-check side by side until stopped."""
        listen = asyncio.create_task(self._listen(), name="tether-policy-listen")
        try:
            period = self.max_staleness_ms / 2000
            while not self._stop.is_set():
                try:
                    await self.refresh()
                except TetherError as err:
                    log.warning("policy re-check failed: %s", err.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), period)
        finally:
            listen.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listen

    async def _listen(self) -> None:
        """LISTENs for new versions; reconnects (after a pause) whenever the connection drops."""
        assert isinstance(self.store, Notifier)
        while not self._stop.is_set():
            try:
                async for _ in self.store.notifications(POLICY_CHANNEL):
                    # The first item ("") means listening: re-read what may have been missed.
                    self.listening = True
                    await self.refresh()
            except TetherError as err:
                log.warning("policy LISTEN connection lost (%s); re-check continues", err.message)
            except Exception:
                log.exception("policy LISTEN failed")
            self.listening = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
