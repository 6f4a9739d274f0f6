"""Store fixtures: every contract test runs against SQLite and PostgreSQL.

PostgreSQL cases use the server on 127.0.0.1:5432 (or TETHER_TEST_POSTGRES_URL)
and are skipped, with the reason, only when it cannot be reached. Each test
module gets a fresh `tether_test_<random>` database, dropped afterwards; tests
in a module start from empty tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from contract_helpers import empty_tables, fresh_database

from tether.store.base import Store
from tether.store.postgres import PostgresStore
from tether.store.sqlite import SqliteStore


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test module."""
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, empty store of each kind."""
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "t.db")
        await s.open()
    else:
        url = request.getfixturevalue("pg_url")
        s = PostgresStore(url)
        await s.open()
        empty_tables(url)
    yield s
    await s.close()
