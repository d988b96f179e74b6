"""PostgreSQL specifics: psycopg 3, ``SKIP LOCKED`` claims, LISTEN/NOTIFY wake-ups."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine, create_engine
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.engine import URL

from ..errors import ConfigError

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
