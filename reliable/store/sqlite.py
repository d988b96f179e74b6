"""SQLite specifics: WAL, busy timeout, ``BEGIN IMMEDIATE`` writes, change detection."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

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

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # The driver must not open transactions on its own; "begin" below does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # Straight to the driver: this runs for every transaction, on the hot paths.
        options = connection.get_execution_options()
        if options.get("reliable_autocommit"):
            return  # one statement, its own transaction
        begin = "BEGIN" if options.get("reliable_read") else "BEGIN IMMEDIATE"
        try:
            connection.connection.driver_connection.execute(begin)
        except sqlite3.Error as exc:
            # Raised here, outside a statement, the driver's own error would reach callers
            # as it is (a read-only file, a lock held past the busy timeout): wrapped, it
            # is a DBAPIError like any other, which the store reports as a StoreError.
            raise DBAPIError.instance(begin, None, exc, sqlite3.Error) from exc

    return engine


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
