"""Per-task and per-agent quotas of the sidecar that no single store enforces.

Memory quotas live in `tether.sidecar.memory` (checked and written in one
transaction) and artifact bytes in the Broker's PutArtifact (counted while
streaming). Here:

- `DenialLimiter`: refused tool calls leave a `tool_denied` receipt, so a
  hostile agent could grow the spool and the ledger by calling what it may not
  call. Each (task, agent) has a token bucket of `per_minute` receipts (that
  many at once, refilled evenly over a minute); past it the call is still
  refused, with RESOURCE_EXHAUSTED and no receipt, and that is logged at most
  once a minute per (task, agent) with how many went unrecorded.
- `WorkspaceQuota`: after each exec or mcp call the task's workspace is
  measured (the count stops once past the quota, so a huge tree costs no more
  than the quota's worth of entries); a task found over it has its next exec
  or mcp call refused before it runs (after one more measurement, in case a
  call still running shrank it). A tree that cannot be read in full counts as
  over: the sidecar fails closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from tether.core import errors as E
from tether.core.clock import Clock

log = logging.getLogger("tether.sidecar.quotas")

MIN_ENTRY_BYTES = 512
"""Each file, directory or link counts at least this much, so a tree of empty files
fills the quota too (and the walk is bounded by quota / 512 entries)."""
MAX_BUCKETS = 4096
"""Above this many buckets, the full ones (indistinguishable from new) are dropped."""
_LOG_EVERY_MS = 60_000


@dataclass
class _Bucket:
    tokens: float
    at_ms: int
    unrecorded: int = 0  # refusals without a receipt since the last log line
    logged_ms: int | None = None


class DenialLimiter:
    """A token bucket of refusal receipts per (task, agent)."""

    def __init__(self, per_minute: int, clock: Clock) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def allow(self, task_id: str, agent: str) -> bool:
        """Takes one receipt from the bucket; False (and counted) when it is empty."""
        now = self._clock.monotonic_ms()
        key = (task_id, agent)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(float(self.per_minute), now)
        self._refill(bucket, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        bucket.unrecorded += 1
        if bucket.logged_ms is None or now - bucket.logged_ms >= _LOG_EVERY_MS:
            log.warning(
                "too many refused tool calls: %d refused without a receipt (more than %d a "
                "minute for this task and agent)",
                bucket.unrecorded,
                self.per_minute,
                extra={"task_id": task_id, "agent_id": agent},
            )
            bucket.unrecorded = 0
            bucket.logged_ms = now
        return False

    def _refill(self, bucket: _Bucket, now: int) -> None:
        elapsed = max(0, now - bucket.at_ms)
        bucket.tokens = min(
            float(self.per_minute), bucket.tokens + elapsed * self.per_minute / 60_000
        )
        bucket.at_ms = now

    def _prune(self, now: int) -> None:
        for key, bucket in list(self._buckets.items()):
            self._refill(bucket, now)
            quiet = bucket.logged_ms is None or now - bucket.logged_ms >= _LOG_EVERY_MS
            if bucket.tokens >= self.per_minute and quiet:
                del self._buckets[key]


def tree_bytes(root: Path, stop_above: int) -> int:
    """Bytes a directory tree takes, counting no further once past `stop_above`.

    Each entry counts the larger of its size, the space it takes on disk and
    `MIN_ENTRY_BYTES`; links are not followed. A missing root is 0.

    Raises:
        OSError: part of the tree cannot be read (e.g. a directory made unreadable).
    """
    total = 0
    pending = [os.fspath(root)]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            total += max(st.st_size, st.st_blocks * 512, MIN_ENTRY_BYTES)
            if total > stop_above:
                return total
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
    return total


class WorkspaceQuota:
    """`workspace_max_bytes` for each task's workspace (exec and mcp tools)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # task -> None (under the quota at the last measurement) or why it is refused
        self._over: dict[str, str | None] = {}

    async def measure(self, task_id: str, workspace: Path) -> str | None:
        """Measures the workspace and remembers the verdict; returns why it is refused, if so.

        A workspace that cannot be measured in full is refused (fail closed).
        """
        try:
            size = await asyncio.to_thread(tree_bytes, workspace, self.max_bytes)
        except OSError as err:
            log.warning(
                "workspace quota: cannot measure %s (%s); refusing its tools",
                workspace,
                err.strerror or err,
                extra={"task_id": task_id},
            )
            why: str | None = (
                f"the workspace of task {task_id!r} cannot be measured "
                f"({err.strerror or err}: a tool left part of it unreadable)"
            )
        else:
            why = None
            if size > self.max_bytes:
                why = (
                    f"the workspace of task {task_id!r} holds more than "
                    f"workspace_max_bytes = {self.max_bytes} bytes"
                )
        self._over[task_id] = why
        return why

    async def check(self, task_id: str, workspace: Path, tool: str) -> None:
        """Refuses a workspace call of a task whose workspace is over the quota.

        Measures first unless the last measurement found the workspace under it.

        Raises:
            ResourceExhausted: the workspace is over `workspace_max_bytes` (names it),
                or cannot be measured.
        """
        if task_id in self._over and self._over[task_id] is None:
            return
        why = await self.measure(task_id, workspace)
        if why is not None:
            raise E.ResourceExhausted(
                f"workspace quota: {why}; tool {tool!r} did not run, and the task's exec "
                "and mcp tools stay refused while it is",
                metadata={
                    "quota": "workspace_max_bytes",
                    "limit": str(self.max_bytes),
                    "tool": tool,
                },
            )

    def forget(self, task_id: str) -> None:
        """Drops what is known of a task (its lease ended on this node)."""
        self._over.pop(task_id, None)
