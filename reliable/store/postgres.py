"""PostgreSQL specifics: psycopg 3, ``SKIP LOCKED`` claims, LISTEN/NOTIFY wake-ups, a
connection of its own for single-statement writes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from ..errors import ConfigError, StoreError

log = logging.getLogger("reliable.store")

CHANNEL = "reliable_jobs"
insert = postgresql_insert
# ``?pgbouncer=true`` on the URL: the server is reached through PgBouncer's transaction
# pooling (docs/performance.md). Read by reliable, never passed to the driver.
POOLER_OPTION = "pgbouncer"


def behind_pooler(url: URL) -> bool:
    """Whether ``url`` says the database is behind a transaction pooler
    (``?pgbouncer=true``); ``ConfigError`` for a value other than true or false."""
    value = url.query.get(POOLER_OPTION)
    if value is None:
        return False
    if isinstance(value, tuple) or value.lower() not in ("true", "false"):
        raise ConfigError(
            "RELIABLE_DATABASE_URL", f"{POOLER_OPTION}= is true or false, got {value!r}"
        )
    return value.lower() == "true"


def driver_url(url: URL) -> URL:
    """``url`` without the options that are reliable's, not the driver's."""
    return url.difference_update_query([POOLER_OPTION])


def make_engine(url: URL, *, pool_size: int) -> Engine:
    """An engine on the psycopg 3 driver, whatever driver the URL named.

    Behind a transaction pooler (``?pgbouncer=true``), consecutive transactions of one
    connection may reach different server sessions, so nothing may rely on session
    state: psycopg's server-side prepared statements are switched off.

    Raises ``ConfigError`` (naming ``RELIABLE_DATABASE_URL``) saying what to install
    when psycopg cannot be imported.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        # The postgres extra is optional; without it SQLAlchemy would fail later with a
        # bare ModuleNotFoundError that does not say how to get the driver.
        raise ConfigError(
            "RELIABLE_DATABASE_URL",
            f"{url.render_as_string(hide_password=True)} needs the psycopg driver, which "
            f"cannot be imported ({exc}): pip install 'reliable[postgres]'",
        ) from exc
    connect_args: dict[str, object] = {"prepare_threshold": None} if behind_pooler(url) else {}
    return create_engine(
        driver_url(url).set(drivername="postgresql+psycopg"),
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        connect_args=connect_args,
    )


class Listener:
    """A thread that LISTENs on ``CHANNEL`` and calls ``wake`` for each notification.

    The insert trigger created by the migrations notifies on every new job, so idle
    workers start it within milliseconds. When the connection drops (a database
    restart), it reconnects with backoff; polling covers the gap.

    Behind a transaction pooler (``?pgbouncer=true``) notifications are delivered to
    whichever client holds the server connection next, or to none: no thread is
    started, and idle workers find new jobs by polling (``RELIABLE_POLL_INTERVAL``).
    """

    def __init__(self, url: URL, wake: Callable[[], None]) -> None:
        self._conninfo = (
            driver_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        self._wake = wake
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reliable-listen", daemon=True)
        if behind_pooler(url):
            log.info("behind PgBouncer: no LISTEN; idle workers poll for new jobs")
            return
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        delay = 0.1
        while not self._stopped.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    self._wake()
                    while not self._stopped.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            self._wake()
            except Exception as exc:  # a dropped connection must not end the thread
                if self._stopped.is_set():
                    return
                log.debug("listener connection lost (%s); reconnecting in %.1fs", exc, delay)
                self._stopped.wait(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


class LoneWrites:
    """A psycopg connection of its own, in autocommit mode, for writes that are one
    statement (a lone enqueue): one round trip, without the pool's checkout, the switch
    to autocommit and back, and the reset on return, which together cost as much time
    as the round trip itself.

    One thread uses it at a time: another finds it busy and takes a pooled connection
    instead, so producers still write in parallel. When the server has dropped it, it
    is closed and the write goes through the pool, which reconnects (a write that had
    reached the server then fails there on its duplicate key, as any write whose
    connection is lost during its commit does).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._connection: Any = None
        self._closed = False
        # The engine's pool emptied (engine.dispose()): connect again at the next write.
        self._stale = False
        event.listen(engine, "engine_disposed", self._disposed)

    def _disposed(self, _engine: Engine) -> None:
        self._stale = True

    def execute(self, sql: str, row: tuple[Any, ...]) -> bool:
        """Run ``sql`` (``%s`` placeholders) with ``row`` bound, committed on its own;
        ``False`` when it was not run here (busy, closed or disconnected: use the pool).
        ``StoreError`` when the database refused it."""
        import psycopg

        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._closed:
                return False
            if self._stale:
                self._stale = False
                self._drop()
            if self._connection is None:
                pooled = self._engine.raw_connection()  # set up as the engine's others
                connection: Any = pooled.driver_connection
                pooled.detach()  # its own from now on: closed by close()
                connection.autocommit = True
                self._connection = connection
            try:
                self._connection.execute(sql, row)
            except psycopg.OperationalError:
                self._drop()
                return False
            except psycopg.Error as exc:
                wrapped = DBAPIError.instance(sql, row, exc, psycopg.Error)
                raise StoreError(f"database write failed: {exc}") from wrapped
            return True
        finally:
            self._lock.release()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception as exc:  # already broken: nothing more to release
                log.debug("closing a dropped connection failed (%s)", exc)

    def close(self) -> None:
        """Close the connection (after the write under way, if any)."""
        with self._lock:
            self._closed = True
            self._drop()
