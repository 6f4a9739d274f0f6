"""SQLite-only store properties; the shared contract is in test_store_contract.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

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


async def test_group_commit_answers_each_caller_and_close_waits(tmp_path: Path) -> None:
    """Transactions arriving during a commit share the next one, a failing one is refused
    alone, a failed COMMIT refuses its whole group (and the store carries on), and close
    answers every accepted transaction first."""
    import asyncio

    import pytest

    from tether.core.errors import StorageError

    store = SqliteStore(tmp_path / "t.db")
    await store.open()
    await store._tx(lambda c: c.execute("CREATE TABLE IF NOT EXISTS g (v INTEGER)"))

    def insert(v: int) -> int:
        def fn(c: sqlite3.Connection) -> int:
            c.execute("INSERT INTO g VALUES (?)", (v,))
            if v == 3:
                raise ValueError("three")
            return v

        return fn

    results = await asyncio.gather(
        *(store._tx(insert(v)) for v in range(6)), return_exceptions=True
    )
    assert results[:3] + results[4:] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], ValueError)

    def breaks_commit(c: sqlite3.Connection) -> None:
        c.execute("COMMIT")  # the group's own COMMIT then fails: none of it is durable

    bad = await asyncio.gather(
        store._tx(insert(10)), store._tx(breaks_commit), return_exceptions=True
    )
    assert isinstance(bad[0], StorageError) or bad[0] == 10  # alone in its group, or not
    assert isinstance(bad[1], StorageError)
    assert await store._tx(insert(7)) == 7  # the store carries on
    late = [asyncio.ensure_future(store._tx(insert(v))) for v in (8, 9)]
    await asyncio.sleep(0)
    await store.close()
    assert [t.result() for t in late] == [8, 9]
    conn = sqlite3.connect(store.path)
    rows = {r[0] for r in conn.execute("SELECT v FROM g")}
    conn.close()
    assert {0, 1, 2, 4, 5, 7, 8, 9} <= rows
    assert 3 not in rows
    with pytest.raises(StorageError):
        await store._tx(insert(11))


async def test_callers_coming_straight_back_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers answered by one COMMIT that send their next transaction at once go
    together in the next one, not the first of them alone and the rest after it."""
    import asyncio

    import tether.store.sqlite as sqlite_store

    groups: list[int] = []
    run_group = sqlite_store._run_group

    def counted(conn: sqlite3.Connection, fns: list[Any]) -> list[Any]:
        groups.append(len(fns))
        return run_group(conn, fns)

    monkeypatch.setattr(sqlite_store, "_run_group", counted)
    store = SqliteStore(tmp_path / "t.db")
    await store.open()
    await store._tx(lambda c: c.execute("CREATE TABLE IF NOT EXISTS g (v INTEGER)"))
    groups.clear()

    async def worker() -> None:
        for _ in range(10):
            await store._tx(lambda c: c.execute("INSERT INTO g VALUES (1)"))

    await asyncio.gather(*(worker() for _ in range(8)))
    await store.close()
    assert sum(groups) == 80
    assert len(groups) <= 12, groups  # about one COMMIT a round (the first goes alone)
