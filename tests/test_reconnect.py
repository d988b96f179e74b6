"""A PostgreSQL server that drops every connection (a restart, a failover, a proxy) is
invisible to callers: the next enqueue works, and a running worker goes on by itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import truncate_postgres
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reliable import Reliable

WAIT = 20.0


def drop_every_connection(url: str) -> int:
    """What a server restart does to clients: every session of the database ends."""
    admin = create_engine(
        make_url(url).set(drivername="postgresql+psycopg", database="postgres"),
        isolation_level="AUTOCOMMIT",
    )
    try:
        with admin.connect() as connection:
            ended = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": make_url(url).database},
            ).scalar()
    finally:
        admin.dispose()
    return int(ended or 0)


@pytest.fixture
def rel(postgres_url: str) -> Iterator[Reliable]:
    truncate_postgres(postgres_url)
    app = Reliable(postgres_url, embedded_worker=False, poll_interval=0.2)
    yield app
    app.close()


def test_the_first_enqueue_after_the_server_dropped_its_connections_works(
    rel: Reliable,
) -> None:
    @rel.task
    def hello(n: int) -> int:
        return n

    hello.enqueue(1)  # the pool now holds an open connection
    assert drop_every_connection(rel.settings.database_url) >= 1
    handle = hello.enqueue(2)
    assert handle.status() == "queued"
    assert rel.get_job(handle.id).task == "hello"


def test_a_worker_goes_on_after_the_server_dropped_its_connections(rel: Reliable) -> None:
    @rel.task
    def hello(n: int) -> int:
        return n

    rel.start_worker(threads=2)
    try:
        assert hello.enqueue(1).result(timeout=WAIT) == 1
        assert drop_every_connection(rel.settings.database_url) >= 1
        assert [hello.enqueue(n).result(timeout=WAIT) for n in range(2, 6)] == [2, 3, 4, 5]
    finally:
        rel.stop_worker(timeout=5)
