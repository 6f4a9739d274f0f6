"""Agent memory: a local SQLite table keyed by (scope, owner, key).

TASK scope is owned by the task id and AGENT scope by the agent name; the
Broker checks that the caller holds the task's lease before it gets here, and
passes the caller's own name as the owner of AGENT entries, so one agent can
never name another agent's memory. Memory is local to the node: a task taken
over by another sidecar starts with empty TASK memory there.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import sqlite3
from pathlib import Path

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 1024 * 1024


class Scope(enum.IntEnum):
    """Values match `tether.v1.MemoryScope`."""

    TASK = 1
    AGENT = 2


class MemoryStore:
    """Durable key/value memory for agents on this node."""

    def __init__(self, path: Path) -> None:
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
        """Stores a value and returns its hex SHA-256."""
        digest = hashlib.sha256(value).hexdigest()
        async with self._lock:
            await asyncio.to_thread(
                self._db.execute,
                "INSERT INTO memory (scope, owner, key, value, sha256, updated_ms)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, owner, key) DO UPDATE SET"
                " value = excluded.value, sha256 = excluded.sha256,"
                " updated_ms = excluded.updated_ms",
                (int(scope), owner, key, value, digest, now_ms),
            )
        return digest

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
