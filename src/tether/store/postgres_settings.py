"""Pool size and server-side timeouts of a PostgreSQL store (no psycopg needed to read them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from tether.core.errors import ConfigError

log = logging.getLogger("tether.store.postgres")


def url_has_password(url: str) -> bool:
    """True when a postgresql:// URL carries a password (in its netloc or a query key)."""
    parts = urlsplit(url)
    return bool(parts.password) or "password" in parse_qs(parts.query)


def warn_password_in_url(url: str) -> None:
    """Warns (without the password) that a URL given on the command line shows in `ps`."""
    if url_has_password(url):
        log.warning(
            "--db carries a password: any local user can read it in `ps` and it lands in "
            "shell history; give it by PGPASSWORD or ~/.pgpass (or a PGPASSFILE) instead"
        )


@dataclass(frozen=True)
class PostgresSettings:
    """Pool size and server-side timeouts of one replica's sessions (docs/operations.md)."""

    pool_min: int = 2
    """Connections kept open when idle."""
    pool_max: int = 10
    """Most connections this replica opens (PostgreSQL's max_connections is shared by all)."""
    connect_timeout_s: int = 5
    """How long opening a connection, or waiting for a free pooled one, may take."""
    statement_timeout_ms: int = 10_000
    """Longest a statement may run; a longer one is canceled (the caller gets UNAVAILABLE)."""
    lock_timeout_ms: int = 3_000
    """Longest a statement waits for a lock (a row, or the ledger's advisory lock)."""
    idle_in_transaction_timeout_ms: int = 5_000
    """The server ends a session idle this long inside a transaction (its process paused
    or partitioned), releasing its locks: the bound on how long it stalls other replicas."""
    replica_id: str = ""
    """Shown in pg_stat_activity.application_name ("tether-control <replica id>"), so
    an operator sees which replica holds a session or a lock."""

    def __post_init__(self) -> None:
        if not 1 <= self.pool_min <= self.pool_max:
            raise ConfigError("PostgreSQL pool: need 1 <= --db-pool-min <= --db-pool-max")
        if self.connect_timeout_s < 1:
            raise ConfigError("--db-connect-timeout-s must be at least 1")
        for name in ("statement_timeout_ms", "lock_timeout_ms", "idle_in_transaction_timeout_ms"):
            if getattr(self, name) < 100:
                raise ConfigError(
                    f"PostgreSQL {name} must be at least 100 ms (0 = none is refused)"
                )

    def application_name(self, purpose: str = "") -> str:
        """ "tether-control[-purpose][ replica]", cut to PostgreSQL's 63 bytes."""
        name = "tether-control" + (f"-{purpose}" if purpose else "")
        if self.replica_id:
            name += f" {self.replica_id}"
        return name.encode()[:63].decode(errors="ignore")

    def session_options(self) -> str:
        """libpq `options`: the timeouts every session of the pool starts with."""
        return (
            f"-c statement_timeout={self.statement_timeout_ms}"
            f" -c lock_timeout={self.lock_timeout_ms}"
            f" -c idle_in_transaction_session_timeout={self.idle_in_transaction_timeout_ms}"
        )
