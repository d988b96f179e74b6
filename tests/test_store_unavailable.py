"""A database that is read-only, full or unreachable (SPEC §9.1, §9.7): enqueue raises a
``StoreError`` naming the problem, an offloaded route answers 503 problem+json with
``Retry-After`` (Flask and Starlette), the status resource too when it cannot read, and
the jobs accepted before stay intact: once the database takes writes again, a worker
that ran through the outage runs each of them exactly once.

- SQLite read-only: every new connection gets ``PRAGMA query_only`` (root ignores file
  modes, so ``chmod`` proves nothing in CI containers).
- SQLite full: ``PRAGMA max_page_count`` at the file's size ("database or disk is full").
- PostgreSQL read-only: ``ALTER DATABASE ... SET default_transaction_read_only`` on a
  database of this test's own, and every session ended so that new ones get it.
- Unreachable: a server that is not there.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import Reliable, StoreError
from reliable.background import backoff
from reliable.integrations.flask import ReliableFlask
from reliable.integrations.starlette import ReliableMiddleware
from reliable.timekeeper import Timekeeper

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PROBLEM = "application/problem+json"
WAIT = 30.0
BIG = "x" * 200_000  # needs new pages wherever it goes


class Shop:
    """A Reliable with a task, and a Flask and a Starlette app offloading a route each;
    every run of a job is counted here."""

    def __init__(self, url: str) -> None:
        self.rel = Reliable(url, embedded_worker=False, poll_interval=0.2)
        self.runs: list[int] = []
        self.lock = threading.Lock()
        rel = self.rel

        @rel.task(retries=50)
        def record(n: int, pad: str = "") -> int:
            with self.lock:
                self.runs.append(n)
            return n

        self.record = record
        flask_app = Flask("outage")
        ReliableFlask(flask_app, rel)

        @flask_app.post("/flask")
        @rel.offload(retries=50)
        def from_flask() -> tuple[dict[str, Any], int]:
            return {"framework": "flask"}, 201

        @rel.offload(retries=50)
        async def from_starlette(request: Request) -> JSONResponse:
            return JSONResponse({"framework": "starlette"}, 201)

        starlette_app = Starlette(
            routes=[Route("/starlette", from_starlette, methods=["POST"])],
            middleware=[Middleware(ReliableMiddleware, reliable=rel)],
        )
        self.flask = flask_app.test_client()
        self.starlette = TestClient(starlette_app, raise_server_exceptions=False)

    def post(self, framework: str, body: str = "{}") -> tuple[int, dict[str, str], Any]:
        if framework == "flask":
            answer = self.flask.post("/flask", data=body, content_type="application/json")
            return answer.status_code, dict(answer.headers), answer.get_json(force=True)
        response = self.starlette.post(
            "/starlette", content=body, headers={"content-type": "application/json"}
        )
        return response.status_code, dict(response.headers), response.json()

    def status(self, framework: str, job_id: str) -> tuple[int, Any]:
        url = f"{self.rel.settings.url_prefix}/jobs/{job_id}"
        if framework == "flask":
            answer = self.flask.get(url)
            return answer.status_code, answer.get_json(force=True)
        response = self.starlette.get(url)
        return response.status_code, response.json()

    def close(self) -> None:
        self.rel.stop_worker(timeout=5)
        self.starlette.close()
        self.rel.close()


def jobs(rel: Reliable) -> dict[str, str]:
    """Every job's status (a read: it works while the database takes no writes)."""
    return {info.id: info.status for info in rel.jobs(limit=1000)}


def refused_everywhere(shop: Shop, problem: str) -> None:
    """While the database takes no writes: a clear error and a 503, nothing stored."""
    before = jobs(shop.rel)
    with pytest.raises(StoreError, match=problem):
        shop.record.enqueue(99, pad=BIG)
    with pytest.raises(StoreError, match=problem):  # a transaction, not one statement
        shop.record.enqueue(98, pad=BIG, idempotency_key="during-the-outage")
    for framework in ("flask", "starlette"):
        status, headers, document = shop.post(framework, f'{{"pad": "{BIG}"}}')
        assert status == 503, document
        headers = {name.lower(): value for name, value in headers.items()}
        assert headers["content-type"] == PROBLEM
        assert int(headers["retry-after"]) >= 1
        assert document["status"] == 503 and "not accepted" in document["detail"]
        assert problem not in document["detail"]  # the database's words stay in the log
    assert jobs(shop.rel) == before


def accepted_jobs_run_once(shop: Shop, accepted: list[str], restore: Callable[[], None]) -> None:
    """A worker that ran through the outage runs every accepted job once it is over."""
    restore()
    for job_id in accepted:
        shop.rel.job(job_id).wait(timeout=WAIT)
    assert set(jobs(shop.rel)) == set(accepted)
    assert all(status == "succeeded" for status in jobs(shop.rel).values())
    assert sorted(shop.runs) == [0, 1, 2]  # the tasks; the routes' jobs ran once each too
    for job_id in accepted:
        assert len(shop.rel.get_attempts(job_id)) <= shop.rel.get_job(job_id).attempts


def accept_some(shop: Shop) -> list[str]:
    accepted = [shop.record.enqueue(n).id for n in range(3)]
    for framework in ("flask", "starlette"):
        status, _, document = shop.post(framework)
        assert status == 202, document
        accepted.append(document["id"])
    return accepted


# -- SQLite ----------------------------------------------------------------------------


@contextmanager
def on_every_connection(engine: Engine, *pragmas: str) -> Iterator[Callable[[], None]]:
    """New connections of ``engine`` run ``pragmas`` until the returned function is
    called; the pool is emptied both times, so that the change reaches every user."""

    done = False

    def configure(dbapi_connection: Any, _record: Any) -> None:
        if not done:
            for pragma in pragmas:
                dbapi_connection.execute(pragma)

    # Listening is set up before any worker runs, and never removed: removing a listener
    # while a worker's thread connects would race SQLAlchemy's dispatch of it.
    event.listen(engine, "connect", configure)
    engine.dispose()

    def restore() -> None:
        nonlocal done
        if not done:
            done = True
            engine.dispose()

    try:
        yield restore
    finally:
        restore()


def page_count(engine: Engine) -> int:
    with engine.connect() as connection:
        count = connection.exec_driver_sql("PRAGMA page_count").scalar()
        connection.rollback()
    return int(count or 0)


@pytest.fixture
def sqlite_shop(tmp_path: Path) -> Iterator[Shop]:
    shop = Shop(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield shop
    shop.close()


@pytest.mark.parametrize(
    ("condition", "problem"),
    [("read-only", "readonly database"), ("full", "database or disk is full")],
)
def test_a_sqlite_database_that_takes_no_writes_refuses_clearly_and_loses_nothing(
    sqlite_shop: Shop, condition: str, problem: str
) -> None:
    shop = sqlite_shop
    accepted = accept_some(shop)
    engine = shop.rel.store.engine
    pragma = (
        "PRAGMA query_only = ON"
        if condition == "read-only"
        else f"PRAGMA max_page_count = {page_count(engine)}"
    )
    with on_every_connection(engine, pragma) as restore:
        refused_everywhere(shop, problem)
        for framework in ("flask", "starlette"):  # reading still works
            status, document = shop.status(framework, accepted[-1])
            assert (status, document["status"]) == (200, "queued")
        shop.rel.start_worker(threads=2)
        accepted_jobs_run_once(shop, accepted, restore)


# -- PostgreSQL ------------------------------------------------------------------------


def admin(url: str) -> Engine:
    return create_engine(
        make_url(url).set(drivername="postgresql+psycopg", database="postgres"),
        isolation_level="AUTOCOMMIT",
    )


@pytest.fixture
def own_postgres_url(postgres_url: str) -> Iterator[str]:
    """A database of this test's own: it is made read-only, which nobody else must see."""
    parsed = make_url(postgres_url)
    name = f"{parsed.database}_readonly"
    url = parsed.set(database=name).render_as_string(hide_password=False)
    engine = admin(postgres_url)
    try:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield url
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def set_read_only(url: str, read_only: bool) -> None:
    """Make new sessions of the database read-only (or not), and end the current ones."""
    name = make_url(url).database
    engine = admin(url)
    try:
        with engine.connect() as connection:
            setting = "SET default_transaction_read_only = on" if read_only else "RESET ALL"
            connection.execute(text(f'ALTER DATABASE "{name}" {setting}'))
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_read_only_postgres_database_refuses_clearly_and_loses_nothing(
    own_postgres_url: str,
) -> None:
    shop = Shop(own_postgres_url)
    try:
        accepted = accept_some(shop)
        set_read_only(own_postgres_url, True)
        try:
            refused_everywhere(shop, "read-only transaction")
            status, document = shop.status("starlette", accepted[0])
            assert (status, document["status"]) == (200, "queued")
            shop.rel.start_worker(threads=2)
        except BaseException:
            set_read_only(own_postgres_url, False)
            raise
        accepted_jobs_run_once(shop, accepted, lambda: set_read_only(own_postgres_url, False))
    finally:
        shop.close()


# -- unreachable -----------------------------------------------------------------------


def test_an_unreachable_database_is_a_store_error_and_a_503() -> None:
    shop = Shop("postgresql://reliable@127.0.0.1:9/nowhere")
    try:
        with pytest.raises(StoreError, match="cannot open the database"):
            shop.record.enqueue(1)
        for framework in ("flask", "starlette"):
            status, _, document = shop.post(framework)
            assert (status, document["status"]) == (503, 503)
            status, document = shop.status(framework, "0" * 32)
            assert (status, document["status"]) == (503, 503)
    finally:
        shop.starlette.close()
        shop.rel.close()


def test_a_worker_thread_backs_off_however_long_the_database_refuses(tmp_path: Path) -> None:
    # A purge (or a tick) that fails is overdue at once: after failures the timekeeper
    # waits its backoff anyway, instead of spinning; and the backoff never overflows.
    assert [backoff(n, 5.0) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff(10_000, 5.0) == 5.0
    app = Reliable(f"sqlite:///{tmp_path / 'jobs.db'}", embedded_worker=False, result_ttl=60)
    try:
        keeper = Timekeeper(app.runtime, None, "w")
        assert keeper._wait(failures=3, next_purge=0.0) == 0.4
        assert keeper._wait(failures=10_000, next_purge=0.0) == 5.0
        assert keeper._wait(failures=0, next_purge=0.0) <= 0.0  # due: purge now
    finally:
        app.close()
