"""SQLite-only store properties; the shared contract is in test_store_contract.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tether.store import store_from_url
from tether.store.sqlite import SqliteStore


async def test_database_uses_wal(tmp_path: Path) -> None:
    """The database runs in WAL mode, which keeps commits across a process kill."""
    store = SqliteStore(tmp_path / "t.db")
    await store.open()
    try:
        conn = sqlite3.connect(store.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        await store.close()


def test_a_path_selects_sqlite(tmp_path: Path) -> None:
    """A --db value that is not a postgresql:// URL names an SQLite file."""
    for value in (tmp_path / "a.db", str(tmp_path / "b.db"), "relative.db"):
        store = store_from_url(value)
        assert isinstance(store, SqliteStore)
        assert store.path == Path(value)
