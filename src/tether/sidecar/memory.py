"""Agent memory: a local SQLite table keyed by (scope, owner, key).

TASK scope is owned by the task id and AGENT scope by the agent name; the
Broker checks that the caller holds the task's lease before it gets here, and
passes the caller's own name as the owner of AGENT entries, so one agent can
never name another agent's memory. Memory is local to the node: a task taken
over by another sidecar starts with empty TASK memory there.

Quotas: each owner (a task's TASK memory, an agent's AGENT memory) holds at
most `max_keys` keys and `max_bytes` bytes (UTF-8 key plus value, summed over
its keys). `put` checks and writes in one SQLite write transaction, so a write
that would cross either quota is refused with nothing written, even with
several writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import sqlite3
from pathlib import Path

from tether.core import errors as E

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 1024 * 1024
DEFAULT_MAX_KEYS = 1_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# What an owner holds, as the quotas count it: keys, and UTF-8 key bytes plus value bytes.
_USAGE = (
    "SELECT count(*), coalesce(sum(length(CAST(key AS BLOB)) + length(value)), 0)"
    " FROM memory WHERE scope = ? AND owner = ?"
)


class Scope(enum.IntEnum):
    """Values match `tether.v1.MemoryScope`."""

    TASK = 1
    AGENT = 2


class MemoryStore:
    """Durable key/value memory for agents on this node."""

    def __init__(
        self,
        path: Path,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS memory ("
            " scope INTEGER NOT NULL, owner TEXT NOT NULL, key TEXT NOT NULL,"
            " value BLOB NOT NULL, sha256 TEXT NOT NULL, updated_ms INTEGER NOT NULL,"
            " PRIMARY KEY (scope, owner, key))"
        )
        self._lock = asyncio.Lock()

    async def put(self, scope: Scope, owner: str, key: str, value: bytes, now_ms: int) -> str:
        """Stores a value and returns its hex SHA-256.

        Raises:
            ResourceExhausted: the write would take the owner past `max_keys` or
                `max_bytes` (the message names the quota); nothing was written.
        """
        digest = hashlib.sha256(value).hexdigest()
        async with self._lock:
            job = asyncio.ensure_future(
                asyncio.to_thread(self._put, scope, owner, key, value, digest, now_ms)
            )
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                # The caller went away; the transaction still ends before the next
                # one may begin on this connection.
                with contextlib.suppress(Exception):
                    await job
                raise
        return digest

    def _put(
        self, scope: Scope, owner: str, key: str, value: bytes, digest: str, now_ms: int
    ) -> None:
        """The quota check and the write, in one write transaction."""
        size = len(key.encode()) + len(value)
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # holds the write lock from the count to the commit
        try:
            keys, total = db.execute(_USAGE, (int(scope), owner)).fetchone()
            old = db.execute(
                "SELECT length(CAST(key AS BLOB)) + length(value) FROM memory"
                " WHERE scope = ? AND owner = ? AND key = ?",
                (int(scope), owner, key),
            ).fetchone()
            if old is None:
                keys += 1
            else:
                total -= old[0]
            total += size
            what = f"{scope.name.lower()} memory of {owner!r}"
            if keys > self.max_keys:
                raise E.ResourceExhausted(
                    f"memory quota: {what} already holds {keys - 1} keys, the most "
                    f"memory_max_keys = {self.max_keys} allows; nothing was written "
                    "(overwrite an existing key instead)",
                    metadata={"quota": "memory_max_keys", "limit": str(self.max_keys)},
                )
            if total > self.max_bytes:
                raise E.ResourceExhausted(
                    f"memory quota: writing {key!r} would bring {what} to {total} bytes, over "
                    f"memory_max_bytes = {self.max_bytes}; nothing was written",
                    metadata={"quota": "memory_max_bytes", "limit": str(self.max_bytes)},
                )
            db.execute(
                "INSERT INTO memory (scope, owner, key, value, sha256, updated_ms)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, owner, key) DO UPDATE SET"
                " value = excluded.value, sha256 = excluded.sha256,"
                " updated_ms = excluded.updated_ms",
                (int(scope), owner, key, value, digest, now_ms),
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def usage(self, scope: Scope, owner: str) -> tuple[int, int]:
        """(keys, bytes) the owner holds, as the quotas count them."""
        async with self._lock:
            row = self._db.execute(_USAGE, (int(scope), owner)).fetchone()
        return int(row[0]), int(row[1])

    async def get(self, scope: Scope, owner: str, key: str) -> bytes | None:
        """Returns the value, or None when the key is not in the scope."""
        async with self._lock:
            row = self._db.execute(
                "SELECT value FROM memory WHERE scope = ? AND owner = ? AND key = ?",
                (int(scope), owner, key),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        self._db.close()
