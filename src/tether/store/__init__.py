"""Stores of the control plane; `store_from_url` picks one from a --db value."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tether.store.base import Store

if TYPE_CHECKING:
    from tether.store.postgres_settings import PostgresSettings


def is_postgres_url(url_or_path: str | Path) -> bool:
    """True for a postgresql:// or postgres:// URL; anything else names an SQLite file."""
    return isinstance(url_or_path, str) and url_or_path.startswith(("postgresql://", "postgres://"))


def store_from_url(
    url_or_path: str | Path,
    *,
    sqlite_synchronous: str = "FULL",
    postgres: PostgresSettings | None = None,
) -> Store:
    """The store a --db value names, not yet opened.

    `postgresql://user@host:port/dbname` selects PostgreSQL (several replicas may
    share it); any other value is the path of an SQLite database file, opened
    with `sqlite_synchronous` ("FULL", the durable default, or "NORMAL").
    `postgres`: pool size and timeouts of a PostgreSQL store.
    """
    if is_postgres_url(url_or_path):
        # Imported lazily: psycopg is an optional dependency (extra "postgres").
        from tether.store.postgres import PostgresStore

        return PostgresStore(str(url_or_path), postgres)
    from tether.store.sqlite import SqliteStore

    return SqliteStore(url_or_path, synchronous=sqlite_synchronous)


async def open_store(url_or_path: str | Path) -> Store:
    """`store_from_url(url_or_path)`, opened (connected and migrated).

    Raises:
        StorageError: the database cannot be opened or migrated.
    """
    store = store_from_url(url_or_path)
    await store.open()
    return store
