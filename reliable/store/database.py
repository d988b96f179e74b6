"""The database under the job store: its URL, engine and transactions, and the signals
that tell waiting threads and processes something changed.

Every write is one transaction. Uniqueness (job ids, idempotency keys) is held by the
database's indexes, not by checks in Python, so it holds across processes and machines.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from ..errors import ConfigError, StoreError
from . import postgres, sqlite
from .migrate import ensure_schema


def parse_database_url(raw: str) -> URL:
    """Parse a database URL; ``postgres://`` and ``postgresql://`` mean psycopg 3."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError("RELIABLE_DATABASE_URL", f"not a database URL: {raw!r}") from exc
    backend = url.get_backend_name()
    if backend == "postgres":
        url = url.set(drivername="postgresql+psycopg")
    elif backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            "RELIABLE_DATABASE_URL", f"only sqlite:// and postgresql:// are supported, got {raw!r}"
        )
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(
            "RELIABLE_DATABASE_URL",
            "an in-memory SQLite database cannot be shared by workers; name a file",
        )
    return url


class Database:
    """A SQLite or PostgreSQL database holding ``reliable``'s tables.

    ``url`` is a SQLAlchemy URL (``sqlite:///jobs.db`` or ``postgresql://...``). The
    schema is brought to the current revision on first use when ``auto_migrate`` is set.
    The job store (``Store``) is this plus its operations, one concept per module.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        sqlite_synchronous: str = "FULL",
        auto_migrate: bool = True,
    ) -> None:
        self.url = parse_database_url(url)
        self.dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self.engine: Engine
        if self.dialect == "sqlite":
            self.engine = sqlite.make_engine(
                self.url, synchronous=sqlite_synchronous, pool_size=pool_size
            )
            self._insert: Any = sqlite.insert
        else:
            self.engine = postgres.make_engine(self.url, pool_size=pool_size)
            self._insert = postgres.insert
        self._changed = threading.Condition()
        self._rotation = 0
        self._known_scopes: set[str] = set()  # concurrency counter rows that exist
        self._wakers: list[Callable[[], None]] = []
        self.closed = False
        self._users = 0  # workers using this store (see hold)
        self._users_lock = threading.Lock()
        # A store dropped without close() still closes its connections, rather than
        # leaving them to the garbage collector (which warns about each one).
        weakref.finalize(self, self.engine.dispose)
        try:
            ensure_schema(self.engine, auto=auto_migrate)
        except DBAPIError as exc:
            raise StoreError(f"cannot open the database {self.describe()}: {exc}") from exc

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as connection:
                yield connection
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    @contextmanager
    def _single_statement(self) -> Iterator[Connection]:
        """A connection in autocommit mode, for a write that is one statement: atomic
        on its own, and one round trip (no BEGIN, no COMMIT) instead of three."""
        # SQLite: the driver already runs in autocommit mode; the option only keeps the
        # "begin" hook from opening a transaction. PostgreSQL: psycopg's autocommit.
        options = (
            {"reliable_autocommit": True}
            if self.dialect == "sqlite"
            else {"isolation_level": "AUTOCOMMIT"}
        )
        try:
            with self.engine.connect() as connection:
                yield connection.execution_options(**options)
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                connection = connection.execution_options(reliable_read=True)
                with connection.begin():
                    yield connection
        except DBAPIError as exc:
            raise StoreError(f"database read failed: {exc.orig}") from exc

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after this process commits new work (workers in this process)."""
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        if wake in self._wakers:
            self._wakers.remove(wake)

    def _wake(self) -> None:
        for wake in list(self._wakers):
            wake()

    def _notify_changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until this process settles or cancels a job, or ``timeout`` passes."""
        with self._changed:
            self._changed.wait(timeout)

    def _notify_other_processes(self, connection: Connection) -> None:
        if self.dialect == "postgresql":
            connection.execute(
                text("SELECT pg_notify(:channel, '')"), {"channel": postgres.CHANNEL}
            )

    def hold(self) -> None:
        """A worker starts using this store: ``close`` leaves the connections to it."""
        with self._users_lock:
            self._users += 1

    def let_go(self) -> None:
        """A worker is done with this store; the last one closes it if ``close`` ran."""
        with self._users_lock:
            self._users -= 1
            last = self._users == 0 and self.closed
        if last:
            self.engine.dispose()

    def close(self) -> None:
        """Close the pooled connections, now, or when the last worker still finishing
        its attempts is done with them."""
        with self._users_lock:
            self.closed = True
            busy = self._users > 0
        if not busy:
            self.engine.dispose()
