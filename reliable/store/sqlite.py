"""SQLite specifics: WAL, busy timeout, ``BEGIN IMMEDIATE`` writes, change detection,
group commit of concurrent single-row inserts."""

from __future__ import annotations

import sqlite3
import threading
import weakref
from functools import partial
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from ..errors import StoreError

BUSY_TIMEOUT_SECONDS = 30.0
# How often an idle worker looks for commits made by other processes.
CHANGE_CHECK_SECONDS = 0.002

insert = sqlite_insert


def make_engine(url: URL, *, synchronous: str, pool_size: int) -> Engine:
    """An engine whose transactions take SQLite's write lock at ``BEGIN``.

    Writers queue on the lock (up to ``BUSY_TIMEOUT_SECONDS``) instead of failing with
    "database is locked" when a read transaction tries to upgrade. A connection with the
    execution option ``reliable_read=True`` begins a plain deferred transaction.
    """
    engine = create_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        pool_size=pool_size,
        max_overflow=pool_size * 2,
    )

    event.listen(engine, "connect", partial(_configure, synchronous=synchronous, own=True))
    event.listen(engine, "begin", partial(_begin, shared=False))
    return engine


# Engines of applications that a store shares, with the listeners already added.
_SHARED: weakref.WeakSet[Engine] = weakref.WeakSet()


def share_engine(engine: Engine, *, synchronous: str) -> Engine:
    """An application's engine, made fit for the store without changing how the
    application's own transactions behave; returns the engine the store uses.

    The store's connections (execution option ``reliable_store``) take the write lock
    at ``BEGIN`` as on the store's own engine; the application's connections are left
    to the driver. Every new connection gets the busy timeout, so that the store and the
    application wait for each other's write lock instead of failing; the file is put in
    WAL mode (readers never wait for a writer), which stays with the file.
    """
    if engine not in _SHARED:
        _SHARED.add(engine)

        event.listen(engine, "connect", partial(_configure, synchronous=synchronous, own=False))
        event.listen(engine, "begin", partial(_begin, shared=True))
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            connection.rollback()
    return engine.execution_options(reliable_store=True)


def _configure(
    dbapi_connection: sqlite3.Connection, _record: Any, *, synchronous: str, own: bool
) -> None:
    """Every new connection: the durability asked for and the busy timeout, so that
    writers wait for each other's lock instead of failing. On the store's own engine
    (``own``) the driver must not open transactions by itself (``_begin`` does), and
    the file is put in WAL mode (a shared engine's file is put in it once)."""
    if own:
        dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    if own:
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
    cursor.close()


def _begin(connection: Any, *, shared: bool) -> None:
    """A store transaction begins: ``BEGIN IMMEDIATE`` (the write lock at once), or a
    deferred ``BEGIN`` for a read (``reliable_read``), nothing for one statement
    (``reliable_autocommit``). On a shared engine, the application's own connections
    are left to the driver. Straight to the driver: this runs for every transaction."""
    options = connection.get_execution_options()
    if options.get("reliable_autocommit") or (shared and not options.get("reliable_store")):
        return
    begin = "BEGIN" if options.get("reliable_read") else "BEGIN IMMEDIATE"
    driver = connection.connection.driver_connection
    try:
        if not (shared and driver.in_transaction):
            driver.execute(begin)
    except sqlite3.Error as exc:
        # Raised here, outside a statement, the driver's own error would reach callers
        # as it is (a read-only file, a lock held past the busy timeout): wrapped, it is
        # a DBAPIError like any other, which the store reports as a StoreError.
        raise DBAPIError.instance(begin, None, exc, sqlite3.Error) from exc


def begin_write(connection: Any) -> None:
    """Make sure a caller's transaction on ``connection`` holds the write lock.

    The driver opens a transaction only before its first write, so one that has only
    read (or done nothing) is not yet a transaction for SQLite: a ``SAVEPOINT`` there
    would start one of its own, and its ``RELEASE`` commit it. ``BEGIN IMMEDIATE`` opens
    the caller's transaction (its commit or rollback ends it) and takes the lock now.
    """
    driver = connection.connection.driver_connection
    try:
        if not driver.in_transaction:
            driver.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:  # a lock held past the busy timeout: a StoreError
        raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc


class _Entry:
    __slots__ = ("error", "lead", "ready", "row")

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row
        self.ready = threading.Event()
        self.lead = False  # woken to write the next batch rather than done
        self.error: BaseException | None = None


class GroupCommit:
    """Rows that threads insert at the same time, committed together.

    SQLite lets one transaction write at a time, and each commit waits for the disk
    (``synchronous=FULL``). Threads that insert while a commit is under way queue their
    rows; when it ends, one of them writes every queued row in one transaction (one
    wait for the disk), and the others wait for it. ``insert`` returns only once its row
    is committed, and raises ``StoreError`` if that transaction failed (then none of
    its rows were written). A lone thread writes its row at once: nothing waits for
    others to come.

    ``sql``: the INSERT (positional placeholders), run on a connection of ``engine``'s
    kept for the group (one batch is written at a time), made anew after the engine's
    pool is disposed of, closed by ``close``.
    """

    def __init__(self, engine: Engine, sql: str) -> None:
        self._engine = engine
        self._sql = sql
        self._lock = threading.Lock()
        self._queued: list[_Entry] = []
        self._writing = False
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        # The engine's pool emptied (engine.dispose()): its next connections may be set
        # up otherwise, and so must the group's; it makes a new one at its next write.
        self._stale = False
        event.listen(engine, "engine_disposed", self._disposed)

    def _disposed(self, _engine: Engine) -> None:
        self._stale = True

    def insert(self, row: tuple[Any, ...]) -> None:
        """Commit ``row``, alone or with the rows of other threads."""
        entry = _Entry(row)
        with self._lock:
            self._queued.append(entry)
            lead = not self._writing
            self._writing = True
        if not lead:
            entry.ready.wait()
            lead = entry.lead
        if lead:
            self._write_queued()
        if isinstance(entry.error, Exception):  # each thread raises its own
            raise StoreError(str(entry.error)) from entry.error
        if entry.error is not None:
            raise entry.error

    def _write_queued(self) -> None:
        with self._lock:
            batch, self._queued = self._queued, []
        try:
            self._write([entry.row for entry in batch])
        except BaseException as exc:
            for entry in batch:
                entry.error = exc
        finally:
            with self._lock:
                if self._queued:  # queued meanwhile: the first of them writes them
                    self._queued[0].lead = True
                    self._queued[0].ready.set()
                else:
                    self._writing = False
                    if self._closed:  # closed while this batch was written
                        self._close_connection()
            for entry in batch:
                entry.ready.set()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """Commit ``rows`` in one transaction (one statement for one row)."""
        if self._closed:
            raise StoreError("the job store is closed")
        try:
            if self._stale:
                self._stale = False
                self._close_connection()
            connection = self._connection
            if connection is None:
                pooled = self._engine.raw_connection()  # with the engine's PRAGMAs
                driver: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
                pooled.detach()  # the group's own from now on: closed by close()
                connection = self._connection = driver
            if len(rows) == 1:
                connection.execute(self._sql, rows[0])  # autocommit: its own transaction
                return
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(self._sql, rows)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            wrapped = DBAPIError.instance(self._sql, None, exc, sqlite3.Error)
            raise StoreError(f"database write failed: {exc}") from wrapped

    def close(self) -> None:
        """Close the group's connection (after the batch being written, if any)."""
        with self._lock:
            self._closed = True
            if not self._writing:
                self._close_connection()
        if event.contains(self._engine, "engine_disposed", self._disposed):
            event.remove(self._engine, "engine_disposed", self._disposed)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class ChangeWatch:
    """Tells when another connection has committed to the database file.

    ``PRAGMA data_version`` changes whenever any other connection commits; checking it
    costs a read of shared memory, so an idle worker can look every few milliseconds.
    """

    def __init__(self, path: str) -> None:
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._version = self._read()

    def _read(self) -> int:
        row = self._connection.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def changed(self) -> bool:
        with self._lock:
            version = self._read()
            if version == self._version:
                return False
            self._version = version
            return True

    def close(self) -> None:
        with self._lock:
            self._connection.close()
