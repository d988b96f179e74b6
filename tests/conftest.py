"""Fixtures: every storage test runs on a real SQLite file and on the real PostgreSQL.

PostgreSQL comes from ``RELIABLE_TEST_POSTGRES_URL`` (``.ci/run`` sets it), or else
from the local default ``postgresql://postgres@127.0.0.1:5432/reliable_test``; the
database is created if missing. When neither is usable the PostgreSQL tests are
skipped, and the run ends by saying how many and why; under ``CI=true`` they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reliable import ManualClock, Reliable
from reliable.store import Store
from reliable.store.schema import metadata

POSTGRES_ENV = "RELIABLE_TEST_POSTGRES_URL"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/reliable_test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Why the PostgreSQL tests were skipped, if they were; said again at the end of the run.
_postgres_skipped: list[str] = []


def _ensure_database(url: str) -> None:
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": parsed.database}
            ).first()
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    finally:
        admin.dispose()


def _drop_database(url: str) -> None:
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test run's own (``<name>_<pid>``), dropped at the end, so
    that runs at the same time on one server do not meet."""
    url = os.environ.get(POSTGRES_ENV) or LOCAL_POSTGRES
    parsed = make_url(url)
    url = parsed.set(database=f"{parsed.database}_{os.getpid()}").render_as_string(
        hide_password=False
    )
    try:
        _ensure_database(url)
        Store(url, pool_size=1).close()  # bring the schema up to date once
    except Exception as exc:
        message = f"PostgreSQL at {parsed.render_as_string()} is not usable: {exc}"
        if IN_CI:
            pytest.fail(message)
        reason = (
            f"{message.splitlines()[0]}; start a server there, or point {POSTGRES_ENV} "
            "at one (bash .ci/run does both)"
        )
        _postgres_skipped.append(reason)
        pytest.skip(reason)
    yield url
    _drop_database(url)


def truncate_postgres(url: str) -> None:
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with engine.begin() as connection:
            names = ", ".join(table.name for table in metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a new SQLite file, or the PostgreSQL test database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url: str = request.getfixturevalue("postgres_url")
    truncate_postgres(url)
    return url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def rel(db_url: str, clock: ManualClock) -> Iterator[Reliable]:
    app = Reliable(db_url, clock=clock, embedded_worker=False)
    yield app
    app.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say at the end of the run how many PostgreSQL tests were skipped, and why."""
    if not _postgres_skipped:
        return
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "postgres" in report.nodeid
    ]
    terminalreporter.write_sep("=", "PostgreSQL tests skipped", yellow=True)
    terminalreporter.write_line(
        f"{len(skipped)} PostgreSQL tests were skipped: {_postgres_skipped[0]}"
    )
