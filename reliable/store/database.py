"""The database under the job store: its URL, engine and transactions, and the signals
that tell waiting threads and processes something changed.

Every write is one transaction. Uniqueness (job ids, idempotency keys) is held by the
database's indexes, not by checks in Python, so it holds across processes and machines.
"""

from __future__ import annotations

import os
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


def same_database(first: URL, second: URL) -> bool:
    """Whether two URLs name one database: one SQLite file (paths resolved), or one
    PostgreSQL database on one server (the user and driver may differ)."""
    if first.get_backend_name() != second.get_backend_name():
        return False
    if first.get_backend_name() == "sqlite":
        if (
            not first.database
            or not second.database
            or ":memory:" in (first.database, second.database)
        ):
            return False
        return os.path.realpath(first.database) == os.path.realpath(second.database)
    return (first.host or "localhost", first.port or 5432, first.database) == (
        second.host or "localhost",
        second.port or 5432,
        second.database,
    )


def masked(url: URL) -> str:
    """A URL as it may be shown: its password replaced by ``***``."""
    return url.render_as_string(hide_password=True)


def masked_url(raw: str) -> str:
    """A database URL as it may be shown (password ``***``); ``raw`` if unparsable."""
    try:
        return masked(make_url(raw))
    except ArgumentError:
        return raw


def check_same_database(store: URL, other: URL, name: str) -> None:
    """Raise ``ConfigError`` naming ``name`` and both URLs (passwords masked) unless
    ``other`` is the job store's database."""
    if not same_database(store, other):
        raise ConfigError(
            name,
            f"it is bound to {masked(other)}, but the job store is {masked(store)}: they "
            "must be one database (jobs in another would never reach the workers); pass "
            "the application's engine, Reliable(engine=...), or enqueue without it",
        )


class Database:
    """A SQLite or PostgreSQL database holding ``reliable``'s tables.

    ``url`` is a SQLAlchemy URL (``sqlite:///jobs.db`` or ``postgresql://...``). The
    schema is brought to the current revision on first use when ``auto_migrate`` is set.
    The job store (``Store``) is this plus its operations, one concept per module.

    ``engine``: an application's own engine, used (its pool shared) instead of one of
    the store's; ``url`` may then be ``None``, or must name the same database
    (``ConfigError`` otherwise). The store never disposes of an engine it was given.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        engine: Engine | None = None,
        pool_size: int = 8,
        sqlite_synchronous: str = "FULL",
        auto_migrate: bool = True,
    ) -> None:
        if engine is not None:
            shared = parse_database_url(engine.url.render_as_string(hide_password=False))
            if url is not None:
                check_same_database(parse_database_url(url), engine.url, "engine")
            self.url = shared
        elif url is None:
            raise ConfigError("RELIABLE_DATABASE_URL", "give a database URL or an engine")
        else:
            self.url = parse_database_url(url)
        self.dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self.engine: Engine
        self.shared = engine is not None
        self._same: dict[URL, bool] = {}  # engines of callers' transactions, checked
        self._insert: Any = sqlite.insert if self.dialect == "sqlite" else postgres.insert
        if engine is not None:
            self.engine = engine
            if self.dialect == "sqlite":
                self.engine = sqlite.share_engine(engine, synchronous=sqlite_synchronous)
        elif self.dialect == "sqlite":
            self.engine = sqlite.make_engine(
                self.url, synchronous=sqlite_synchronous, pool_size=pool_size
            )
        else:
            self.engine = postgres.make_engine(self.url, pool_size=pool_size)
        self._autocommit: Engine | None = None  # see _single_statement
        self._groups: dict[str, sqlite.GroupCommit] = {}  # see _insert_alone
        self._lone: postgres.LoneWrites | None = None  # the same, on PostgreSQL
        self._changed = threading.Condition()
        self._rotation = 0
        self._known_scopes: set[str] = set()  # concurrency counter rows that exist
        self._wakers: list[Callable[[], None]] = []
        self.closed = False
        self._users = 0  # workers using this store (see hold)
        self._users_lock = threading.Lock()
        # A store dropped without close() still closes its connections, rather than
        # leaving them to the garbage collector (which warns about each one).
        if not self.shared:
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
        if self._autocommit is None:
            # SQLite: the driver already runs in autocommit mode; the option only keeps
            # the "begin" hook from opening a transaction. PostgreSQL: psycopg's
            # autocommit. Made once: options set per connection cost a copy each time.
            options: dict[str, Any] = (
                {"reliable_autocommit": True}
                if self.dialect == "sqlite"
                else {"isolation_level": "AUTOCOMMIT"}
            )
            if self.shared and self.dialect == "sqlite":
                # A shared engine's driver opens transactions itself: switched off here.
                options["isolation_level"] = "AUTOCOMMIT"
            self._autocommit = self.engine.execution_options(**options)
        try:
            with self._autocommit.connect() as connection:
                yield connection
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    def _insert_alone(self, sql: str, row: tuple[Any, ...]) -> bool:
        """On the store's own engine, commit one row: ``sql`` (compiled by SQLAlchemy,
        positional placeholders) with the bound values ``row``; ``False`` when not done
        (a shared engine; PostgreSQL's connection busy or lost): use ``_single_statement``.

        PostgreSQL: one statement on a connection kept for it (``postgres.LoneWrites``).

        SQLite: rows of threads inserting at the same time are committed together, one wait
        for the disk for all (``sqlite.GroupCommit``); a lone row is one statement in
        autocommit mode. As the group writes one batch at a time, it keeps one
        connection of its own (made by the engine, with its PRAGMAs), and skips the
        pool's checkout and the ``Connection`` wrapper, which cost as much CPU as
        SQLite's insert itself. SQLite never drops a connection: no reconnect to handle.
        """
        if self.shared or self.closed:
            return False
        if self.dialect == "postgresql":
            if self._lone is None:
                with self._users_lock:
                    if self._lone is None:
                        self._lone = postgres.LoneWrites(self.engine)
            return self._lone.execute(sql, row)
        group = self._groups.get(sql)
        if group is None:  # one per statement (there is one: the job INSERT)
            with self._users_lock:
                group = self._groups.get(sql)
                if group is None:
                    group = self._groups[sql] = sqlite.GroupCommit(self.engine, sql)
        group.insert(row)
        return True

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                connection = connection.execution_options(reliable_read=True)
                with connection.begin():
                    yield connection
        except DBAPIError as exc:
            raise StoreError(f"database read failed: {exc.orig}") from exc

    def joined(self, within: object) -> Connection:
        """The connection of a caller's open transaction: ``within`` is a SQLAlchemy
        ``Connection``, or a ``Session`` (or ``scoped_session``), whose transaction it
        begins if none is open (on its default bind).

        Raises ``ConfigError`` for anything else, for a closed connection, and for one
        bound to another database than this store (naming both, passwords masked).
        """
        connection = within
        if not isinstance(within, Connection):
            get = getattr(within, "connection", None)
            if not callable(get):
                raise ConfigError(
                    "session",
                    f"expected a SQLAlchemy Session or Connection, got {type(within).__name__}",
                )
            connection = get()
        if not isinstance(connection, Connection):
            raise ConfigError(
                "session", f"{type(within).__name__}.connection() gave no SQLAlchemy Connection"
            )
        if connection.closed or connection.invalidated:
            raise ConfigError("connection", "the connection is closed: enqueue in an open one")
        engine = connection.engine
        same = self._same.get(engine.url)
        if same is None:
            same = self._same[engine.url] = same_database(self.url, engine.url)
        if not same:
            check_same_database(self.url, engine.url, "session")
        return connection

    def commit(self, within: object) -> None:
        """Commit a caller's transaction (``Session`` or ``Connection``; an offloaded
        route's, before its 202); ``StoreError`` when the database refuses."""
        commit = getattr(within, "commit", None)
        if not callable(commit):
            raise ConfigError("session", f"cannot commit a {type(within).__name__}")
        try:
            commit()
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    @staticmethod
    def still_open(connection: Connection) -> Callable[[], bool]:
        """Whether the transaction ``connection`` is in now is still open (so what it
        wrote is not yet visible to anyone else, and may yet be rolled back)."""
        transaction = connection.get_transaction()
        if transaction is None:
            return lambda: False
        return lambda: transaction.is_active

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
        if last and not self.shared:
            self.engine.dispose()

    def close(self) -> None:
        """Close the pooled connections, now, or when the last worker still finishing
        its attempts is done with them."""
        with self._users_lock:
            self.closed = True
            busy = self._users > 0
            groups, self._groups = list(self._groups.values()), {}
            lone, self._lone = self._lone, None
        for group in groups:
            group.close()
        if lone is not None:
            lone.close()
        if not busy and not self.shared:
            self.engine.dispose()


def shared_engine_url(engine: object, database_url: str | None) -> str:
    """The URL of an application's ``engine`` for the job store to share, checked: a
    SQLAlchemy ``Engine`` on SQLite (a file) or PostgreSQL, on the same database as
    ``database_url`` when one is given. ``ConfigError`` naming ``engine`` otherwise."""
    if not isinstance(engine, Engine):
        raise ConfigError("engine", f"expected a SQLAlchemy Engine, got {type(engine).__name__}")
    url = engine.url
    try:
        parse_database_url(url.render_as_string(hide_password=False))
    except ConfigError as exc:
        raise ConfigError("engine", str(exc).partition(": ")[2]) from exc
    if database_url is not None:
        check_same_database(parse_database_url(database_url), url, "engine")
    return url.render_as_string(hide_password=False)
